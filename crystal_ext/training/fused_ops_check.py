"""Part c of the run-time objective check: each fused op against its plain-PyTorch reference
(crystal_ext.ops.reference) at the run's shapes and dtype, on the model's device."""

from __future__ import annotations

import contextlib

import torch

from crystal_ext.model.parts import backbone_and_head, text_config
from crystal_ext.ops.layout import IGNORE, segments_of
from crystal_ext.training.check_report import TOLERANCES, relative_error, short_number

# The fused LM-head op is compared with every pair kept: two pairs whose KL differ by a rounding
# error may be kept by one implementation and dropped by the other, a discontinuity, not an error
# (the top-k rule itself has its own tests).
EVERY_PAIR = 1.0


@contextlib.contextmanager
def full_float32_matmuls():
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
        return max(relative_error(f, r, floor) for f, r, floor in zip(fused, ref, floors)), "relative"
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
    """Part c: the fused LM-head losses (when the objective runs them) on the batch's own rows of
    `hidden`, then the attention ops on random q, k, v of the model's attention shapes, unless
    their references would build more than `max_attention_elements` probabilities."""
    report.lines.append(
        f"  c. fused ops against their plain-PyTorch references ({str(report.dtype).replace('torch.', '')})"
    )
    if objective.lm_head_losses == "fused":
        _check_lm_head_losses(report, model, batch, hidden)
    shape = alignment_layer_shape(model, objective.alignment_layer)
    _check_attention_ops(report, shape, batch, hidden.device, max_attention_elements)


def _logit_rows(batch, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the flat rows that need logits; the teacher, student and sample indices into them),
    written out here apart from the objective's own selection."""
    targets = batch["targets"]
    length = targets.shape[1]
    rows, teacher, student, sample = [], [], [], []
    for b, seg in enumerate(segments_of(batch["layout"].cpu())):
        need = [
            r for r in range(length) if targets[b, r] != IGNORE or r in seg.span("e") or r in seg.span("f")
        ]
        slot = {r: len(rows) + i for i, r in enumerate(need)}
        rows += [b * length + r for r in need]
        teacher += [slot[r] for r in seg.span("e")]
        student += [slot[r] for r in seg.span("f")]
        sample += [b] * seg.size("e")
    return torch.tensor(rows, device=device), [
        torch.tensor(x, device=device) for x in (teacher, student, sample)
    ]


def _check_lm_head_losses(report, model, batch, hidden) -> None:
    from crystal_ext.ops import lm_head_losses, reference

    dtype, tol = report.dtype, TOLERANCES[report.dtype].ops
    _, _, head = backbone_and_head(model)
    flat, index = _logit_rows(batch, hidden.device)
    row_targets = batch["targets"].flatten()[flat]
    weight = head.weight.detach()
    bias = None if head.bias is None else head.bias.detach()
    h = hidden.flatten(0, 1)[flat].detach()

    def lm_head(fused, args):
        fn = lm_head_losses if fused else reference.lm_head_losses
        hid, w = args[0], args[1]
        b = None if bias is None else bias.to(w.dtype)
        return _with_grads(lambda x: fn(x, w, row_targets, *index, EVERY_PAIR, bias=b), [hid], [0.7, 1.3])

    # A small KL is the difference of two nearly equal log-sum-exps in any formula, so it loses
    # digits to cancellation: its error counts relative to the CE it is added to.
    ce = float(reference.lm_head_losses(h, weight, row_targets, *index, EVERY_PAIR, bias=bias)[0])
    error, how = _op_error(lm_head, [h, weight], dtype, floors=[0.0, abs(ce), 0.0])
    report.measure(
        f"lm_head_losses (ce, kl, d hidden) at hidden [{h.shape[0]}, {h.shape[1]}], weight "
        f"[{weight.shape[0]}, {weight.shape[1]}], {how}",
        error,
        tol,
        fail=f"fused lm_head_losses differs from its reference by {short_number(error)} ({how}, > {tol:g}) "
        f"at hidden [{h.shape[0]}, {h.shape[1]}], weight [{weight.shape[0]}, {weight.shape[1]}]",
    )


def alignment_layer_shape(model, alignment_layer: str) -> tuple[int, int, int, int]:
    """(layer index, query heads, key/value heads, head dim) of the text layer whose attention the
    alignment loss reads (crystal_ext.model.alignment_layer): its attention module's own head
    size and grouping where it has them, else the text config's."""
    from crystal_ext.model.alignment_layer import alignment_layer_index
    from crystal_ext.model.attention_registration import is_text_decoder_attention

    text = text_config(model)
    index = alignment_layer_index(text, alignment_layer)
    if getattr(text, "per_layer_config", None):  # layers of several shapes (Gemma 4): the chosen one's
        text = text.per_layer_config[index]
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    _, backbone, _ = backbone_and_head(model)
    for module in backbone.modules():
        if is_text_decoder_attention(module) and module.layer_idx == index:
            head_dim = getattr(module, "head_dim", head_dim)
            kv_heads = heads // getattr(module, "num_key_value_groups", heads // kv_heads)
            break
    return index, heads, kv_heads, head_dim


def _check_attention_ops(report, shape, batch, device, max_attention_elements: int) -> None:
    from crystal_ext.model.dual_path_attention import dual_path_attention
    from crystal_ext.ops import attention_alignment_loss, reference

    dtype, tol = report.dtype, TOLERANCES[report.dtype].ops
    index, heads, kv_heads, head_dim = shape
    batch_size, length = batch["targets"].shape
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
        f" (text layer {index}'s)"
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
            fail=f"fused {name.split()[0]} differs from its reference by {short_number(error)} "
            f"({how}, > {tol:g}) at {shape}",
        )
