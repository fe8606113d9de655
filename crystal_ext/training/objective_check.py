"""The run-time proof that the objective trains the model it is given: on a few examples of the
run's own data, packed as training packs them, before the first optimizer step.

  a. Path 1 is the stock model. The stock model's own forward on the path-1 sequence [A, C, D, E]
     alone (its own attention, its own mask from attention_mask, its own position numbering: no
     position_ids are passed; its own head and logit transform) gives logits at the D and E rows
     and their cross entropy; the objective's machinery (the dual-path backbone forward and the
     LM head as the objective applies it) must give the same. A wrong logit transform, wrong
     positions or a wrong mask all show here.
  b. Path 2 differs from path 1 only by the corruption. With the corruption replaced by the
     identity, F's logits equal E's, and KL_pred and KL_attn of the objective are ~0.
  c. The fused ops equal their plain-PyTorch references (crystal_ext.ops.reference) at the run's
     shapes and dtype, on the model's device.

Tolerances depend on the dtype (TOLERANCES; docs/training.md gives the reasoning). A failure
raises ObjectiveCheckFailed, whose message names the model type, the quantity and how far off it
is; `python -m crystal_ext.check` and `python -m crystal_ext.train` turn it into exit status 2.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import time

import torch
import torch.nn.functional as F

from crystal_ext.data.example import SkipExample
from crystal_ext.data.images import ExampleImages
from crystal_ext.data.packing import DualPathCollator
from crystal_ext.model.families.base import TEXT_KEYS
from crystal_ext.model.objective import (
    ObjectiveConfig,
    crystal_objective,
    lm_head_logits,
)
from crystal_ext.model.parts import backbone_and_head, text_config, unwrap_peft
from crystal_ext.ops.layout import IGNORE, segments_of
from crystal_ext.training.check_report import (
    TOLERANCES,
    CheckReport,
    ObjectiveCheckFailed,
    relative_error,
    short_number,
)
from crystal_ext.training.fused_ops_check import check_ops, full_float32_matmuls

STOCK_ATTENTION = "sdpa"  # how crystal_ext.train and crystal_ext.check load a model

# ---- the examples ------------------------------------------------------------------------------


def pick_examples(packer, examples, count: int, tries: int = 50) -> list:
    """The first `count` examples of `examples` that pack (others are skipped, as training skips
    them), looking at no more than `tries` of them."""
    chosen = []
    for i in range(min(len(examples), tries)):
        ex = examples[i]
        try:
            packer.pack(ex)
        except SkipExample:
            continue
        chosen.append(ex)
        if len(chosen) == count:
            break
    if not chosen:
        raise ObjectiveCheckFailed(
            f"crystal_ext.check: none of the first {min(len(examples), tries)} examples could be packed"
        )
    return chosen


class UncorruptedImages(ExampleImages):
    """An example's images as the packer makes them ready, with the corruption replaced by the
    identity."""

    def corrupted(self, example, intact: list) -> list:
        return [image.copy() for image in intact]


def identity_packer(packer):
    """`packer` with the corruption replaced by the identity: path 2 then sees path 1's images."""
    twin = copy.copy(packer)
    images = packer.images
    twin.images = UncorruptedImages(images.size, images.corruption, images.seed)
    return twin


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _collate(packer, examples, device) -> dict:
    pad = getattr(packer.tok, "pad_token_id", None)
    batch = DualPathCollator(packer, 0 if pad is None else pad)(examples)
    if batch is None or len(batch["keys"]) != len(examples):
        raise ObjectiveCheckFailed("crystal_ext.check: an example that packed once did not pack again")
    return _to(batch, device)


# ---- a. path 1 against the stock forward ---------------------------------------------------------


@contextlib.contextmanager
def _stock_attention(model):
    """The model with transformers' own attention for the duration of the block."""
    base = unwrap_peft(model)
    was = text_config(base)._attn_implementation
    if was == STOCK_ATTENTION:
        yield
        return
    base.set_attn_implementation(STOCK_ATTENTION)
    try:
        yield
    finally:
        base.set_attn_implementation(was)


def _path1_rows(batch: dict) -> list[tuple[int, list[int], list[int]]]:
    """Per sample: (sample, packed rows of path 1 that carry a target, their index in path 1)."""
    out = []
    targets = batch["targets"].cpu()
    for b, seg in enumerate(segments_of(batch["layout"].cpu())):
        slot = {r: i for i, r in enumerate(seg.path1())}
        rows = [r for r in slot if targets[b, r] != IGNORE]
        out.append((b, rows, [slot[r] for r in rows]))
    return out


def stock_path1_logits(
    model, packer, ex, batch: dict, b: int, slots: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [rows, V] of the stock forward at path-1 indices `slots`, the tokens they predict).

    The stock model reads the processor's own output for the prompt (its text keys extended over
    D and E: ids, attention mask 1, token types 0) and numbers positions itself."""
    seg = segments_of(batch["layout"].cpu())[b]
    ids = batch["input_ids"][b].cpu()[torch.tensor(seg.path1())]
    images = packer.images.intact(ex)
    processed = packer.processor(
        text=[packer.chat.prompt(ex)], images=[images], return_tensors="pt", add_special_tokens=False
    )
    prompt = processed["input_ids"][0]
    if not torch.equal(prompt, ids[: prompt.numel()]):
        raise ObjectiveCheckFailed(
            f"crystal_ext.check: example {ex.key!r}: the packed path-1 tokens do not start with the "
            "processor's own tokens of the prompt"
        )
    tail = ids.numel() - prompt.numel()
    inputs = {}
    for key, value in processed.items():
        if key == "input_ids":
            value = ids[None]
        elif key == "attention_mask":
            value = torch.ones_like(ids)[None]
        elif key in TEXT_KEYS and isinstance(value, torch.Tensor):
            value = torch.cat([value, value.new_zeros(1, tail)], dim=1)
        inputs[key] = value
    base = unwrap_peft(model)
    device = next(base.parameters()).device
    # D and E end the sequence: where the forward takes logits_to_keep, the model's head runs on
    # the last rows only (at a vocabulary of 152k the full logits would cost more than the layers).
    keep = {}
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        keep["logits_to_keep"] = ids.numel() - min(slots)
    with _stock_attention(base):
        logits = base(**_to(inputs, device), **keep, use_cache=False).logits[0]
    slots = torch.tensor(slots)
    return logits[(slots - (ids.numel() - logits.shape[0])).to(logits.device)], ids[slots + 1]


def objective_with_hidden(model, batch: dict, objective: ObjectiveConfig):
    """(the objective's CrystalLoss on `batch`, the last hidden states [batch, length, Hd] its
    backbone forward produced, in packed order)."""
    _, backbone, _ = backbone_and_head(model)
    seen = []
    hook = backbone.register_forward_hook(lambda module, args, out: seen.append(out.last_hidden_state))
    try:
        out = crystal_objective(model, batch, objective)
    finally:
        hook.remove()
    (hidden,) = seen
    if objective.crystal:
        return out, hidden
    # The baseline ran path 1 alone, sample b's path 1 at the start of its row: back to packed order.
    packed = hidden.new_zeros(*batch["input_ids"].shape, hidden.shape[-1])
    for b, seg in enumerate(segments_of(batch["layout"].cpu())):
        path1 = torch.tensor(seg.path1(), device=hidden.device)
        packed[b, path1] = hidden[b, : path1.numel()]
    return out, packed


def _without_path2_targets(batch: dict) -> dict:
    targets = batch["targets"].clone()
    for b, seg in enumerate(segments_of(batch["layout"].cpu())):
        targets[b, seg.f[0] : seg.f[1]] = IGNORE
    return {**batch, "targets": targets}


def check_path1(report, model, packer, examples, batch, objective):
    out, hidden = objective_with_hidden(model, _without_path2_targets(batch), objective)
    ours_ce = out.ce
    stock_logits, stock_targets, worst = [], [], (0.0, None)
    for (b, rows, slots), ex in zip(_path1_rows(batch), examples):
        theirs, wanted = stock_path1_logits(model, packer, ex, batch, b, slots)
        if not torch.equal(wanted, batch["targets"][b, rows].cpu()):
            raise ObjectiveCheckFailed(
                f"crystal_ext.check: {report.model_type}: example {ex.key!r}: the packed targets of path 1 "
                "are not the next tokens of the path-1 sequence"
            )
        ours = lm_head_logits(model, hidden[b, rows])
        theirs = theirs.to(ours.dtype)
        error = relative_error(ours, theirs)
        worst = max(worst, (error, ex.key), key=lambda t: t[0]) if worst[1] else (error, ex.key)
        stock_logits.append(theirs)
        stock_targets.append(wanted.to(theirs.device))
    stock_ce = F.cross_entropy(torch.cat(stock_logits), torch.cat(stock_targets))
    rows = sum(len(t) for t in stock_targets)
    rel = abs(float(ours_ce) - float(stock_ce)) / max(abs(float(stock_ce)), 1e-30)
    tol = TOLERANCES[report.dtype].relative
    report.lines.append(f"  a. path 1 [A, C, D, E] against the stock model's own forward ({rows} D/E rows)")
    report.measure(
        "path-1 CE, relative",
        rel,
        tol,
        f"; objective {float(ours_ce):.4f}, stock forward {float(stock_ce):.4f}",
        f"path-1 CE {float(ours_ce):.4g} vs the stock forward's {float(stock_ce):.4g} "
        f"(relative {short_number(rel)} > {tol:g})",
    )
    report.measure(
        "path-1 logits at the D/E rows, relative",
        worst[0],
        tol,
        f"; worst example {worst[1]!r}",
        f"path-1 logits at the D/E rows of example {worst[1]!r} differ from the stock forward's by "
        f"{short_number(worst[0])} of their largest value (> {tol:g})",
    )
    return hidden


# ---- b. the identity corruption ------------------------------------------------------------------


def check_identity(report, model, packer, examples, objective):
    device = next(unwrap_peft(model).parameters()).device
    batch = _collate(identity_packer(packer), examples, device)
    out, hidden = objective_with_hidden(model, batch, objective)
    worst = (0.0, None)
    for (b, seg), key in zip(enumerate(segments_of(batch["layout"].cpu())), batch["keys"]):
        e = lm_head_logits(model, hidden[b, seg.e[0] : seg.e[1]])
        f = lm_head_logits(model, hidden[b, seg.f[0] : seg.f[1]])
        error = relative_error(f, e)
        worst = max(worst, (error, key), key=lambda t: t[0]) if worst[1] else (error, key)
    tol = TOLERANCES[report.dtype]
    report.lines.append("  b. the corrupted path with the identity corruption against the intact path")
    report.measure(
        "F's logits vs E's, relative",
        worst[0],
        tol.relative,
        f"; worst example {worst[1]!r}",
        f"with the identity corruption, F's logits of example {worst[1]!r} differ from E's by "
        f"{short_number(worst[0])} of their largest value (> {tol.relative:g})",
    )
    for name, value in (("KL_pred", out.kl_pred), ("KL_attn", out.kl_attn)):
        value = float(value)
        report.measure(
            name,
            abs(value) if value == value else float("inf"),
            tol.kl,
            " nats",
            f"{name} {short_number(value)} with the identity corruption (> {tol.kl:g}; should be ~0)",
        )


# ---- the whole check -----------------------------------------------------------------------------


def _timed(report, part, *args):
    """part(*args), its seconds appended to the first line it reports."""
    first, started = len(report.lines), time.monotonic()
    out = part(*args)
    if len(report.lines) > first:
        report.lines[first] += f" [{time.monotonic() - started:.1f} s]"
    return out


def check_objective(
    model, packer, examples, objective: ObjectiveConfig = ObjectiveConfig(), count: int = 2, ops: bool = True
) -> CheckReport:
    """Run checks a, b (dual-path objective only) and c (`ops`) on the first `count` examples of
    `examples` that pack; return the report, or raise ObjectiveCheckFailed listing every quantity
    out of tolerance. The model is left in the mode (train / eval) it came in."""
    started = time.monotonic()
    base = unwrap_peft(model)
    param = next(base.parameters())
    dtype = param.dtype
    if dtype not in TOLERANCES:
        raise ObjectiveCheckFailed(f"crystal_ext.check: no tolerance for a model in {dtype}")
    report = CheckReport(str(base.config.model_type), dtype, param.device)
    chosen = pick_examples(packer, examples, count)
    report.examples = [str(ex.key) for ex in chosen]
    was_training = model.training
    model.eval()  # dropout (LoRA's too) off: both sides must compute the same function
    try:
        with torch.no_grad():
            batch = _collate(packer, chosen, param.device)
            hidden = _timed(report, check_path1, report, model, packer, chosen, batch, objective)
            if objective.crystal:
                _timed(report, check_identity, report, model, packer, chosen, objective)
        if objective.crystal and ops:
            with full_float32_matmuls():
                _timed(report, check_ops, report, model, batch, objective, hidden)
        elif objective.crystal:
            report.lines.append("  c. fused ops: skipped")
    finally:
        model.train(was_training)
    report.seconds = time.monotonic() - started
    if report.failures:
        raise ObjectiveCheckFailed("\n".join(report.failures + ["", report.summary()]))
    return report
