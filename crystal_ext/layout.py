"""The dual-path layout (DESIGN.md section 2) in plain PyTorch: validation and the dense mask.

A layout is an int64 tensor [batch, 6, 2]: (start, end) of segments A..F of each sample.
  A prefix, B corrupted image + prompt, C intact image + prompt, D latent block,
  E answer (intact path), F copy of the answer (corrupted path).
Rows of A, C, D, E (path 1) see keys in A, C, D, E; rows of B, F (path 2) see keys in
A, B, D, F; and always key <= row. Positions from F.end to the padded length take part in
nothing.
"""

from __future__ import annotations

import torch

SEGMENTS = ("A", "B", "C", "D", "E", "F")
SEGMENT_NAMES = (
    "A (prefix)",
    "B (corrupted image + prompt)",
    "C (intact image + prompt)",
    "D (latent block)",
    "E (answer, intact path)",
    "F (answer, corrupted path)",
)
A, B, C, D, E, F = range(6)


def segment_bounds(sizes) -> list[list[int]]:
    """[[start, end]] of consecutive segments of the given sizes, starting at 0 (one sample's
    layout rows from |A|..|F|)."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append([start, start + size])
        start += size
    return bounds


def validate_layout(layout, batch: int, length: int, op: str = "crystal_ext") -> list[list[int]]:
    """Check a layout against the rules of DESIGN.md section 2 and return it as nested lists
    ([batch][12] ints). Raises ValueError naming `layout` and the broken rule."""
    if not isinstance(layout, torch.Tensor):
        raise ValueError(f"{op}: layout must be a torch.Tensor, got {type(layout).__name__}")
    if layout.dtype != torch.int64:
        raise ValueError(f"{op}: layout must be int64 (torch.long), got {layout.dtype}")
    if layout.dim() != 3 or tuple(layout.shape) != (batch, 6, 2):
        raise ValueError(
            f"{op}: layout must have shape [batch={batch}, 6, 2] ((start, end) of segments "
            f"A..F), got {list(layout.shape)}"
        )
    rows = layout.reshape(batch, 12).tolist()
    for b, r in enumerate(rows):
        if r[0] != 0:
            raise ValueError(f"{op}: layout[{b}]: segment A must start at 0, got start {r[0]}")
        for s in range(6):
            start, end = r[2 * s], r[2 * s + 1]
            if start > end:
                raise ValueError(
                    f"{op}: layout[{b}]: segment {SEGMENT_NAMES[s]} has start {start} > end {end}"
                )
            if s < 5 and end != r[2 * s + 2]:
                raise ValueError(
                    f"{op}: layout[{b}]: segments must be contiguous end to end, but "
                    f"{SEGMENT_NAMES[s]} ends at {end} and {SEGMENT_NAMES[s + 1]} starts at "
                    f"{r[2 * s + 2]}"
                )
        if r[11] > length:
            raise ValueError(
                f"{op}: layout[{b}]: segment F ends at {r[11]}, beyond the sequence length "
                f"{length} of q and k"
            )
        size = [r[2 * s + 1] - r[2 * s] for s in range(6)]
        if size[B] != size[C]:
            raise ValueError(
                f"{op}: layout[{b}]: |B| must equal |C| (both paths see the same prompt), got "
                f"|B|={size[B]} and |C|={size[C]}"
            )
        if size[D] < 1:
            raise ValueError(
                f"{op}: layout[{b}]: segment D (latent block) is empty; at least one latent "
                "token is needed"
            )
        if size[E] < 1:
            raise ValueError(
                f"{op}: layout[{b}]: segment E (answer) is empty; at least one answer token is "
                "needed"
            )
        if size[F] != size[E]:
            raise ValueError(
                f"{op}: layout[{b}]: |E| must equal |F| (F copies the answer), got "
                f"|E|={size[E]} and |F|={size[F]}"
            )
    return rows


def segment_ids(layout: torch.Tensor, length: int) -> torch.Tensor:
    """[batch, length] int64: the segment (0..5 for A..F) of each position, -1 for padding."""
    pos = torch.arange(length, device=layout.device)
    ids = torch.full((layout.shape[0], length), -1, dtype=torch.long, device=layout.device)
    for s in range(6):
        start = layout[:, s, 0:1]
        end = layout[:, s, 1:2]
        ids = torch.where((pos >= start) & (pos < end), torch.full_like(ids, s), ids)
    return ids


def dual_path_mask(layout: torch.Tensor, length: int) -> torch.Tensor:
    """Dense boolean visibility [batch, length, length] (row = query, column = key).

    The plain statement of the rule, used by the references; the fused ops never build it.
    """
    seg = segment_ids(layout, length)
    path1 = (seg == A) | (seg == C) | (seg == D) | (seg == E)  # [batch, length]
    path2 = (seg == A) | (seg == B) | (seg == D) | (seg == F)
    row_is_p1 = (seg == A) | (seg == C) | (seg == D) | (seg == E)
    row_is_p2 = (seg == B) | (seg == F)
    causal = torch.ones(length, length, dtype=torch.bool, device=layout.device).tril()
    visible = (row_is_p1[:, :, None] & path1[:, None, :]) | (row_is_p2[:, :, None] & path2[:, None, :])
    return visible & causal
