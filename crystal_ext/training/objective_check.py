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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from crystal_ext.data.example import SkipExample
from crystal_ext.data.packing import DualPathCollator
from crystal_ext.model.families.base import TEXT_KEYS
from crystal_ext.model.objective import (
    ObjectiveConfig,
    crystal_objective,
    lm_head_logits,
)
from crystal_ext.model.parts import backbone_and_head, text_config, unwrap_peft
from crystal_ext.ops.layout import IGNORE, segments_of

STOCK_ATTENTION = "sdpa"  # how crystal_ext.train and crystal_ext.check load a model
# The fused LM-head op is compared with every pair kept: two pairs whose KL differ by a rounding
# error may be kept by one implementation and dropped by the other, a discontinuity, not an error
# (the top-k rule itself has its own tests).
EVERY_PAIR = 1.0


@dataclass(frozen=True)
class Tolerance:
    """relative: CE and logits, |ours - theirs| / |theirs| (logits: the largest difference over
    the largest logit); kl: KL_pred and KL_attn with the identity corruption, in nats; ops: the
    fused ops against their references in this dtype, relative (float32, float64) or, for
    bfloat16 / float16, the factor by which the fused op's error may exceed the reference's
    (both measured against a float32 run)."""

    relative: float
    kl: float
    ops: float


TOLERANCES = {
    torch.float64: Tolerance(relative=1e-9, kl=1e-12, ops=1e-9),
    torch.float32: Tolerance(relative=1e-4, kl=1e-7, ops=1e-4),
    torch.bfloat16: Tolerance(relative=2e-2, kl=1e-3, ops=3.0),
    torch.float16: Tolerance(relative=5e-3, kl=1e-4, ops=3.0),
}


class ObjectiveCheckFailed(RuntimeError):
    """The objective does not reproduce the model; the message says which quantity and how far."""


@dataclass
class CheckReport:
    model_type: str
    dtype: torch.dtype
    device: torch.device
    examples: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def measure(self, name: str, value: float, limit: float, detail: str = "", fail: str | None = None):
        """Record a measured quantity; past `limit` it is a failure, worded by `fail`."""
        ok = value <= limit
        self.lines.append(f"  {'ok  ' if ok else 'FAIL'} {name}: {_num(value)} (limit {limit:g}){detail}")
        if not ok:
            self.failures.append(f"crystal_ext.check: {self.model_type}: {fail or f'{name} {_num(value)}'}")

    def summary(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        head = (
            f"crystal_ext.check: {self.model_type} ({dtype}, {self.device.type}): objective checked against "
            f"the stock model on {len(self.examples)} examples ({', '.join(self.examples)}) in {self.seconds:.1f} s"
        )
        return "\n".join([head, *self.lines, "  passed" if not self.failures else "  FAILED"])


def _num(x: float) -> str:
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e4 else f"{x:.1e}"


def _relative(ours: torch.Tensor, theirs: torch.Tensor, floor: float = 0.0) -> float:
    """Largest difference over the largest magnitude of `theirs` (so near-zero entries do not
    dominate), or over `floor` when that is larger; NaN anywhere counts as infinitely far."""
    ours, theirs = ours.detach().double(), theirs.detach().double()
    diff = (ours - theirs).abs().max()
    if not torch.isfinite(diff):
        return float("inf")
    return float(diff / theirs.abs().max().clamp_min(max(floor, 1e-30)))


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


def identity_packer(packer):
    """`packer` with the corruption replaced by the identity: path 2 then sees path 1's images."""
    twin = copy.copy(packer)
    twin.corrupted = lambda ex, images: [im.copy() for im in images]
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
    images = packer.load_images(ex)
    processed = packer.processor(
        text=[packer.prompt(ex)], images=[images], return_tensors="pt", add_special_tokens=False
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
        error = _relative(ours, theirs)
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
        f"(relative {_num(rel)} > {tol:g})",
    )
    report.measure(
        "path-1 logits at the D/E rows, relative",
        worst[0],
        tol,
        f"; worst example {worst[1]!r}",
        f"path-1 logits at the D/E rows of example {worst[1]!r} differ from the stock forward's by "
        f"{_num(worst[0])} of their largest value (> {tol:g})",
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
        error = _relative(f, e)
        worst = max(worst, (error, key), key=lambda t: t[0]) if worst[1] else (error, key)
    tol = TOLERANCES[report.dtype]
    report.lines.append("  b. the corrupted path with the identity corruption against the intact path")
    report.measure(
        "F's logits vs E's, relative",
        worst[0],
        tol.relative,
        f"; worst example {worst[1]!r}",
        f"with the identity corruption, F's logits of example {worst[1]!r} differ from E's by "
        f"{_num(worst[0])} of their largest value (> {tol.relative:g})",
    )
    for name, value in (("KL_pred", out.kl_pred), ("KL_attn", out.kl_attn)):
        value = float(value)
        report.measure(
            name,
            abs(value) if value == value else float("inf"),
            tol.kl,
            " nats",
            f"{name} {_num(value)} with the identity corruption (> {tol.kl:g}; should be ~0)",
        )


# ---- c. fused ops against their references -------------------------------------------------------


@contextlib.contextmanager
def _full_float32_matmuls():
    """TF32 off (a run may have turned it on): the references must be computed in float32."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        torch.set_float32_matmul_precision(precision)


def _op_error(run, args, dtype, floors=None) -> tuple[float, str]:
    """(error, how it is measured) of `run(fused?, args)` -> tuple of tensors. float32 / float64:
    the fused op against the reference in the same dtype, relative (each output's largest
    difference over its largest value, or over its entry of `floors` when larger). bfloat16 /
    float16: each one's error (Euclidean norm) against a float32 run, as the ratio fused /
    reference, where an error under one rounding of the dtype at the output's scale counts as no
    error."""
    fused, ref = run(True, args), run(False, args)
    floors = floors or [0.0] * len(ref)
    if dtype in (torch.float32, torch.float64):
        return max(_relative(f, r, floor) for f, r, floor in zip(fused, ref, floors)), "relative"
    gold = run(False, [a.float() if a.is_floating_point() else a for a in args])
    unit = torch.finfo(dtype).eps / 2
    ratios = []
    for f, r, g, floor in zip(fused, ref, gold, floors):
        f, r, g = f.detach().double(), r.detach().double(), g.detach().double()
        if not torch.isfinite(f).all():
            return float("inf"), "error / the reference's error in the same dtype"
        slack = unit * max(float(g.norm()), floor)
        ratios.append(float((f - g).norm()) / (float((r - g).norm()) + slack))
    return max(ratios), "error / the reference's error in the same dtype"


def _with_grads(fn, inputs: list[torch.Tensor], upstream: list[float | torch.Tensor]):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o * u).sum() if isinstance(u, torch.Tensor) else o * u for o, u in zip(outs, upstream))
    grads = torch.autograd.grad(total, leaves)
    return tuple(o.detach() for o in outs) + tuple(grads)


def check_ops(report, model, batch, objective, hidden, max_attention_elements: int = 2**27):
    from crystal_ext.model.dual_path_attention import dual_path_attention
    from crystal_ext.ops import attention_alignment_loss, lm_head_losses, reference

    dtype, tol = report.dtype, TOLERANCES[report.dtype].ops
    _, _, head = backbone_and_head(model)
    samples = segments_of(batch["layout"].cpu())
    targets = batch["targets"]
    length = targets.shape[1]
    rows, teacher, student, sample = [], [], [], []
    for b, seg in enumerate(samples):
        need = [
            r for r in range(length) if targets[b, r] != IGNORE or r in seg.span("e") or r in seg.span("f")
        ]
        slot = {r: len(rows) + i for i, r in enumerate(need)}
        rows += [b * length + r for r in need]
        teacher += [slot[r] for r in seg.span("e")]
        student += [slot[r] for r in seg.span("f")]
        sample += [b] * seg.size("e")
    device = hidden.device
    flat = torch.tensor(rows, device=device)
    index = [torch.tensor(x, device=device) for x in (teacher, student, sample)]
    row_targets = targets.flatten()[flat]
    weight = head.weight.detach()
    bias = None if head.bias is None else head.bias.detach()
    h = hidden.flatten(0, 1)[flat].detach()
    report.lines.append(
        f"  c. fused ops against their plain-PyTorch references ({str(dtype).replace('torch.', '')})"
    )

    def lm_head(fused, args):
        fn = lm_head_losses if fused else reference.lm_head_losses
        hid, w = args[0], args[1]
        b = None if bias is None else bias.to(w.dtype)
        return _with_grads(lambda x: fn(x, w, row_targets, *index, EVERY_PAIR, bias=b), [hid], [0.7, 1.3])

    if objective.lm_head_losses == "fused":
        # A small KL is the difference of two nearly equal log-sum-exps in any formula, so it loses
        # digits to cancellation: its error counts relative to the CE it is added to.
        ce = float(reference.lm_head_losses(h, weight, row_targets, *index, EVERY_PAIR, bias=bias)[0])
        error, how = _op_error(lm_head, [h, weight], dtype, floors=[0.0, abs(ce), 0.0])
        report.measure(
            f"lm_head_losses (ce, kl, d hidden) at hidden [{h.shape[0]}, {h.shape[1]}], weight "
            f"[{weight.shape[0]}, {weight.shape[1]}], {how}",
            error,
            tol,
            fail=f"fused lm_head_losses differs from its reference by {_num(error)} ({how}, > {tol:g}) "
            f"at hidden [{h.shape[0]}, {h.shape[1]}], weight [{weight.shape[0]}, {weight.shape[1]}]",
        )
    text = text_config(model)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    batch_size = targets.shape[0]
    if batch_size * heads * length * length > max_attention_elements:
        report.lines.append(
            f"  skip attention ops: their references build [{batch_size}, {heads}, {length}, {length}] "
            f"probabilities (more than {max_attention_elements} values)"
        )
        return
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q = randn(batch_size, heads, length, head_dim)
    k, v = randn(batch_size, kv_heads, length, head_dim), randn(batch_size, kv_heads, length, head_dim)
    layout = batch["layout"]

    def alignment(fused, args):
        fn = attention_alignment_loss if fused else reference.attention_alignment_loss
        return _with_grads(lambda a, b: fn(a, b, layout), list(args), [1.0])

    def attention(fused, args):
        fn = dual_path_attention if fused else reference.dual_path_attention
        up = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(1)).to(args[0])
        return _with_grads(lambda a, b, c: fn(a, b, c, layout), list(args), [up])

    shape = (
        f"q [{batch_size}, {heads}, {length}, {head_dim}], k [{batch_size}, {kv_heads}, {length}, {head_dim}]"
    )
    for name, run, args in (
        ("attention_alignment_loss (loss, d q, d k)", alignment, [q, k]),
        ("dual_path_attention (out, d q, d k, d v)", attention, [q, k, v]),
    ):
        error, how = _op_error(run, args, dtype)
        report.measure(
            f"{name} at {shape}, {how}",
            error,
            tol,
            fail=f"fused {name.split()[0]} differs from its reference by {_num(error)} ({how}, > {tol:g}) at {shape}",
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
            with _full_float32_matmuls():
                _timed(report, check_ops, report, model, batch, objective, hidden)
        elif objective.crystal:
            report.lines.append("  c. fused ops: skipped")
    finally:
        model.train(was_training)
    report.seconds = time.monotonic() - started
    if report.failures:
        raise ObjectiveCheckFailed("\n".join(report.failures + ["", report.summary()]))
    return report
