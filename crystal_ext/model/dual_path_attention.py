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
The gathers are row selections (one index_select of both paths' rows per tensor) in the
[batch, length, heads, head_dim] layout the model's projections produce (q/k/v arrive as its
transposed views), and the output is returned in that layout too: row copies whose backward adds
rows back, and no transposing copy on either side (an elementwise gather per path over
[batch, heads, length, head_dim] and its scatter-add backward cost about twice as much, measured on
the CPU).

Layers that are not plain causal attention (Gemma 3: docs/method.md, "Sliding windows and image
blocks") run each path with a path-local boolean mask [P, P] instead of `is_causal`:
  - a sliding window w: row i sees key j only if i - j < w, counted on path-local indices.
    In [A, C, D, E] and [A, B, D, F] the path-local index IS the path position (B takes C's
    positions, F takes E's; tests/test_dual_path_windows.py checks it on packed batches), so the
    window is the stock single-path run's window of each path, whatever the packed distance;
  - bidirectional image blocks: a run of consecutive image tokens of one path sees itself in both
    directions (the stock rule: AND(window, OR(causal, same block))). Each path's blocks are found
    on that path's own tokens, so C's images pair only with path 1's rows and B's with path 2's.
The masks are built once per forward (per window size, with or without the image blocks: Gemma 4
makes them bidirectional on its sliding layers only) by the plan, and only for such layers.

Layers that reuse an earlier layer's keys and values (Gemma 4's KV-shared layers) are handed that
layer's packed k/v [batch, kv_heads, length, head_dim] and gather them like their own: path 2 reads
the A, B, D, F keys of the layer that computed them, with the same visibility there as here. The
storing layer's gathered rows are not kept for them: selecting k/v again is a small part of a
layer's work (about 0.3% of the Gemma 4 step of benchmarks/test_windowed_family_step.py on the
CPU), and keeping them would hold both paths' k/v through the forward, under activation
checkpointing too.
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


def flat_rows(idx: torch.Tensor, length: int) -> torch.Tensor:
    """[batch * P]: the rows idx [batch, P] (positions in each sample) as indices into the
    [batch * length] rows of the whole batch."""
    return (idx + torch.arange(idx.shape[0])[:, None] * length).flatten()


def _both_paths(x: torch.Tensor, plan: "DualPathPlan") -> tuple[torch.Tensor, torch.Tensor]:
    """x [batch, heads, length, dim] -> (path 1 [batch, heads, P1, dim], path 2 [batch, heads, P2,
    dim]): both paths' rows in one row selection, so the backward adds the gradients of A's and D's
    rows from both paths in one pass; each path a view of a contiguous [batch, P, heads, dim]."""
    batch, heads, length, dim = x.shape
    picked = x.transpose(1, 2).reshape(batch * length, heads, dim).index_select(0, plan.path_rows)
    sizes = (plan.idx1.shape[1], plan.idx2.shape[1])
    parts = picked.split([batch * p for p in sizes])
    return tuple(part.view(batch, p, heads, dim).transpose(1, 2) for part, p in zip(parts, sizes))


def _sdpa(q, k, v, scale, mask=None):
    """Causal SDPA, or SDPA under a boolean `mask` [batch, 1, P, P] (True: visible)."""
    # Grouped-query heads: SDPA broadcasts the kv heads itself, no repeat copies.
    gqa = {} if q.shape[1] == k.shape[1] else {"enable_gqa": True}
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, **gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **gqa)


def image_block_ids(is_image: torch.Tensor) -> torch.Tensor:
    """[batch, P] block ids of one path's tokens: each run of consecutive image tokens is one
    image's block (0, 1, ...), -1 elsewhere (the stock Gemma 3 rule, applied per path)."""
    previous = F.pad(is_image, (1, 0))[:, :-1]
    starts = is_image & ~previous
    return torch.where(is_image, starts.long().cumsum(1) - 1, -1)


def path_mask(order: torch.Tensor, blocks: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """Boolean [batch, 1, P, P] visibility inside one gathered path: AND(window, OR(causal, same
    image block)). `order` [batch, P]: the index a row's window counts (the path position);
    `blocks` [batch, P]: image_block_ids of the path, -1 on padding; `window`: None for full."""
    rows, cols = order[:, :, None], order[:, None, :]
    visible = cols <= rows
    if blocks is not None:
        visible = visible | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
    if window is not None:
        visible = visible & (rows - cols < window)
    return visible[:, None]


def _output_rows(src: torch.Tensor, p1: int, p2: int) -> torch.Tensor:
    """[batch * length]: where each packed row's output lives in the rows of
    cat([path 1's batch * p1 rows, path 2's batch * p2 rows, one zero row]); `src` as path_indices
    returns it (per sample: [path 1 slots, path 2 slots, zero row])."""
    batch = src.shape[0]
    sample = torch.arange(batch)[:, None]
    rows = torch.where(src < p1, sample * p1 + src, batch * p1 + sample * p2 + src - p1)
    return torch.where(src < p1 + p2, rows, batch * (p1 + p2)).flatten()


class DualPathPlan:
    """What every layer of one forward needs from the layout: the checked layout
    (crystal_ext.ops.layout.CheckedLayout: its host copy and Segments), the gather / scatter-back
    indices on the compute device, and the fused alignment loss's indices (`alignment`,
    crystal_ext.ops.attention_alignment_loss.AlignmentIndices, built when first asked for). Built
    once per forward (by the first text layer, see crystal_ext.model.attention_registration), with
    pinned asynchronous copies, so neither the layers nor the alignment op read the layout again
    and, on a GPU, nothing waits for the device. With `image_tokens` (bool [batch, length]) or a
    sliding window, the path-local masks are built on the device on first use, once per window
    size and image-block choice (`masks`)."""

    def __init__(self, layout: CheckedLayout, device: torch.device, image_tokens: torch.Tensor | None = None):
        self.layout_cpu = layout.host
        self.segments = layout.segments
        self.batch, self.length, self.device = layout.batch, layout.length, torch.device(device)
        batch, length = self.batch, self.length
        idx1, idx2, src = path_indices(self.segments, length)
        self.longest_path = idx1.shape[1]  # |A|+|C|+|D|+|E| = |A|+|B|+|D|+|F| of the longest sample
        lengths = torch.tensor([len(s.path1()) for s in self.segments])
        valid = torch.arange(self.longest_path)[None] < lengths[:, None]  # the real slots of each path
        path_rows = torch.cat([flat_rows(idx1, length), flat_rows(idx2, length)])  # path 1's, then path 2's
        output_rows = _output_rows(src, idx1.shape[1], idx2.shape[1])
        on_device = copy_to_device((idx1, idx2, src, valid.long(), path_rows, output_rows), self.device)
        self.idx1, self.idx2, self.src, valid, self.path_rows, self.output_rows = on_device
        self.valid = valid.bool()
        if image_tokens is not None and tuple(image_tokens.shape) != (batch, length):
            raise ValueError(
                f"{_OP}: image_tokens must be [batch, length] = [{batch}, {length}], got {list(image_tokens.shape)}"
            )
        self.image_tokens = None if image_tokens is None else image_tokens.to(self.device, torch.bool)
        self._masks: dict = {}

    def _blocks(self, idx: torch.Tensor) -> torch.Tensor | None:
        if self.image_tokens is None:
            return None
        return image_block_ids(self.image_tokens.gather(1, idx) & self.valid)

    def masks(
        self, window: int | None, image_blocks: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(path-1 mask, path-2 mask) for a layer with this sliding window (None: full), or None
        when plain causal attention is exact (no image blocks, no window shorter than a path).
        `image_blocks`: whether this layer makes the plan's image blocks bidirectional (Gemma 4
        does on its sliding layers only)."""
        if window is not None and window >= self.longest_path:
            window = None  # the window cuts no row of any path
        blocks = image_blocks and self.image_tokens is not None
        if window is None and not blocks:
            return None
        if (window, blocks) not in self._masks:
            # The window counts path positions, which are the path-local indices (module docstring).
            order = torch.arange(self.longest_path, device=self.device).expand(self.batch, -1)
            self._masks[window, blocks] = tuple(
                path_mask(order, self._blocks(idx) if blocks else None, window)
                for idx in (self.idx1, self.idx2)
            )
        return self._masks[window, blocks]

    @functools.cached_property
    def alignment(self) -> AlignmentIndices:
        """The fused alignment loss's indices, built on first use (by the last layer)."""
        return alignment_indices(self.layout_cpu, self.length, self.device)

    def matches(self, q: torch.Tensor) -> bool:
        return (q.shape[0], q.shape[2], q.device) == (self.batch, self.length, self.device)


def dual_path_attention_planned(
    q,
    k,
    v,
    plan: DualPathPlan,
    scale: float | None = None,
    window: int | None = None,
    image_blocks: bool = True,
) -> torch.Tensor:
    """dual_path_attention with the layout work done beforehand (see DualPathPlan); `window`: the
    layer's sliding window (None: full attention); image blocks come with the plan, and apply to
    this layer unless `image_blocks` is False."""
    _check_qkv(q, k, v, _OP)
    if not plan.matches(q):
        raise ValueError(
            f"{_OP}: the plan was built for batch {plan.batch}, length {plan.length} on "
            f"{plan.device}, but q is {list(q.shape)} on {q.device}"
        )
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{_OP}: window must be a positive int or None, got {window!r}")
    mask1, mask2 = plan.masks(window, image_blocks) or (None, None)
    (q1, q2), (k1, k2), (v1, v2) = (_both_paths(t, plan) for t in (q, k, v))
    out1 = _sdpa(q1, k1, v1, scale, mask1)
    out2 = _sdpa(q2, k2, v2, scale, mask2)
    batch, heads, length, dim = q.shape
    rows = [out.transpose(1, 2).reshape(-1, heads, dim) for out in (out1, out2)]
    rows = torch.cat([*rows, q.new_zeros(1, heads, dim)]).index_select(0, plan.output_rows)
    return rows.view(batch, length, heads, dim).transpose(1, 2)


def dual_path_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: torch.Tensor,
    scale: float | None = None,
    window: int | None = None,
    image_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + dual-path mask) v, without building the L x L mask.

    Args:
        q: [batch, heads, length, head_dim] (after rotary embedding).
        k, v: [batch, kv_heads, length, head_dim], same dtype and device; heads % kv_heads == 0.
        layout: int64 [batch, 6, 2], (start, end) of segments A..F (crystal_ext.ops.layout).
        scale: softmax scale, default head_dim ** -0.5.
        window: a sliding window counted on path positions (None: full attention).
        image_tokens: bool [batch, length], True on image tokens: each image's run of tokens is
            bidirectional inside its own path (None: plain causal).

    Returns:
        [batch, heads, length, head_dim] in q's dtype (a view of a contiguous
        [batch, length, heads, head_dim]); rows after F.end are zeros.
    """
    _check_qkv(q, k, v, _OP)
    plan = DualPathPlan(check_layout(layout, q.shape[0], q.shape[2], _OP), q.device, image_tokens)
    return dual_path_attention_planned(q, k, v, plan, scale, window)
