r"""Dual-path attention (docs/method.md) as a composition of torch SDPA calls.

For one sample with segments A..F the dual-path rule is: rows of A, C, D, E see keys of
A, C, D, E; rows of B, F see keys of A, B, D, F; always key <= row. Both key sets keep
the packed order, so after gathering each path into its own contiguous sequence the rule
is plain causal attention inside that sequence:

  path 1 = [A, C, D, E]  -> causal SDPA; gives the outputs of rows A, C, D, E
  path 2 = [A, B, D, F]  -> causal SDPA; gives the outputs of rows B, F (its A and D
                            rows repeat path 1's and are discarded: |A| + |D| extra rows)

The A and D keys/values of path 2 are the same tensors as path 1's. Samples of different
lengths are batched by padding each gathered sequence at its END: under a causal mask a
real row never sees a later padded key, so no mask is needed and SDPA may use its
flash-class kernels. Packed positions after F.end (batch padding) output zeros.
No L x L mask is ever built; the only copies are the gathered q/k/v and the outputs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from crystal_ext.ops.attention_alignment_loss import AlignmentIndices, alignment_indices
from crystal_ext.ops.layout import CheckedLayout, Segments, check_layout, copy_to_device

_OP = "dual_path_attention"


def _check_qkv(q, k, v, op: str) -> None:
    for name, t, dims in (("q", q, "heads"), ("k", k, "kv_heads"), ("v", v, "kv_heads")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must be a 4-D tensor [batch, {dims}, length, head_dim], got "
                f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on the device of q ({q.device}), got {t.device}")
    if (k.shape[0], k.shape[2], k.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]):
        raise ValueError(
            f"{op}: k {list(k.shape)} does not match q {list(q.shape)} in batch, length or head_dim"
        )
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(
            f"{op}: v {list(v.shape)} does not match k {list(k.shape)} in batch, kv_heads or length"
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{op}: the heads of q ({q.shape[1]}) must be a multiple of the kv_heads "
            f"of k and v ({k.shape[1]})"
        )


def path_indices(
    samples: tuple[Segments, ...], length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather and scatter-back indices for a validated layout (the `Segments` of each sample).

    Returns (idx1 [batch, P1], idx2 [batch, P2], src [batch, length]) on the CPU:
    idx1/idx2 list the packed positions of path 1 ([A, C, D, E]) and path 2 ([A, B, D, F]),
    padded at the end with position 0 (a real key; see the module docstring for why that is
    harmless). src[b, p] says where row p's output lives in cat([out1, out2, zero_row]):
    path-1 rows at their path-1 slot, B and F rows at P1 + their path-2 slot, padding at
    the zero row P1 + P2.
    """
    paths1 = [seg.path1() for seg in samples]
    paths2 = [seg.path2() for seg in samples]
    p1 = max(len(p) for p in paths1)
    p2 = max(len(p) for p in paths2)
    idx1 = torch.tensor([p + [0] * (p1 - len(p)) for p in paths1], dtype=torch.long)
    idx2 = torch.tensor([p + [0] * (p2 - len(p)) for p in paths2], dtype=torch.long)
    src = torch.full((len(samples), length), p1 + p2, dtype=torch.long)
    for b, seg in enumerate(samples):
        src[b, torch.tensor(paths1[b], dtype=torch.long)] = torch.arange(len(paths1[b]))
        # Path 2 is [A, B, D, F]: B's slots follow A's, F's follow A's, B's and D's.
        b_slot = p1 + seg.size("a")
        f_slot = b_slot + seg.size("b") + seg.size("d")
        src[b, seg.b[0] : seg.b[1]] = b_slot + torch.arange(seg.size("b"))
        src[b, seg.f[0] : seg.f[1]] = f_slot + torch.arange(seg.size("f"))
    return idx1, idx2, src


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    batch, heads, _, dim = x.shape
    return x.gather(2, idx[:, None, :, None].expand(batch, heads, idx.shape[1], dim))


def _causal_sdpa(q, k, v, scale):
    if q.shape[1] == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    # Grouped-query heads: SDPA broadcasts the kv heads itself, no repeat copies.
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)


class DualPathPlan:
    """What every layer of one forward needs from the layout: the checked layout
    (crystal_ext.ops.layout.CheckedLayout: its host copy and Segments), the gather / scatter-back
    indices on the compute device, and the fused alignment loss's indices (`alignment`,
    crystal_ext.ops.attention_alignment_loss.AlignmentIndices, built when first asked for). Built
    once per forward (by the first text layer, see crystal_ext.model.attention_registration), with
    pinned asynchronous copies, so neither the layers nor the alignment op read the layout again
    and, on a GPU, nothing waits for the device."""

    def __init__(self, layout: CheckedLayout, device: torch.device):
        self.layout_cpu = layout.host
        self.segments = layout.segments
        self.batch, self.length, self.device = layout.batch, layout.length, torch.device(device)
        self.idx1, self.idx2, self.src = copy_to_device(path_indices(self.segments, self.length), self.device)

    @functools.cached_property
    def alignment(self) -> AlignmentIndices:
        """The fused alignment loss's indices, built on first use (by the last layer)."""
        return alignment_indices(self.layout_cpu, self.length, self.device)

    def matches(self, q: torch.Tensor) -> bool:
        return (q.shape[0], q.shape[2], q.device) == (self.batch, self.length, self.device)


def dual_path_attention_planned(q, k, v, plan: DualPathPlan, scale: float | None = None) -> torch.Tensor:
    """dual_path_attention with the layout work done beforehand (see DualPathPlan)."""
    _check_qkv(q, k, v, _OP)
    if not plan.matches(q):
        raise ValueError(
            f"{_OP}: the plan was built for batch {plan.batch}, length {plan.length} on "
            f"{plan.device}, but q is {list(q.shape)} on {q.device}"
        )
    out1 = _causal_sdpa(_gather(q, plan.idx1), _gather(k, plan.idx1), _gather(v, plan.idx1), scale)
    out2 = _causal_sdpa(_gather(q, plan.idx2), _gather(k, plan.idx2), _gather(v, plan.idx2), scale)
    zero_row = q.new_zeros(q.shape[0], q.shape[1], 1, q.shape[3])
    return _gather(torch.cat([out1, out2, zero_row], dim=2), plan.src)


def dual_path_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + dual-path mask) v, without building the mask.

    Args:
        q: [batch, heads, length, head_dim] (after rotary embedding).
        k, v: [batch, kv_heads, length, head_dim], same dtype and device; heads % kv_heads == 0.
        layout: int64 [batch, 6, 2], (start, end) of segments A..F (crystal_ext.ops.layout).
        scale: softmax scale, default head_dim ** -0.5.

    Returns:
        [batch, heads, length, head_dim] in q's dtype; rows after F.end are zeros.
    """
    _check_qkv(q, k, v, _OP)
    plan = DualPathPlan(check_layout(layout, q.shape[0], q.shape[2], _OP), q.device)
    return dual_path_attention_planned(q, k, v, plan, scale)
