"""The dual-path layout (docs/method.md) in plain PyTorch: the per-sample `Segments` view,
validation, and the dense mask.

A layout is an int64 tensor [batch, 6, 2]: (start, end) of segments A..F of each sample.
  A prefix, B corrupted image + prompt, C intact image + prompt, D latent block,
  E answer (intact path), F copy of the answer (corrupted path).
Rows of A, C, D, E (path 1) see keys in A, C, D, E; rows of B, F (path 2) see keys in
A, B, D, F; and always key <= row. Positions from F.end to the padded length take part in
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

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
IGNORE = -100  # target of a row that is trained to predict nothing


@dataclass(frozen=True)
class Segments:
    """Named (start, end) spans A..F of one sample of a layout; the one way a layout is read.

    A prefix, B corrupted images + prompt, C intact images + prompt, D latent block,
    E answer (intact path), F copy of the answer (corrupted path)."""

    a: tuple[int, int]
    b: tuple[int, int]
    c: tuple[int, int]
    d: tuple[int, int]
    e: tuple[int, int]
    f: tuple[int, int]

    @classmethod
    def from_bounds(cls, bounds) -> "Segments":
        """From one sample's [6, 2] bounds (a tensor or nested lists)."""
        rows = bounds.tolist() if isinstance(bounds, torch.Tensor) else bounds
        return cls(*(tuple(int(v) for v in r) for r in rows))

    @property
    def end(self) -> int:
        """End of the sample's packed sequence (F.end); later positions are padding."""
        return self.f[1]

    def span(self, name: str) -> range:
        start, end = getattr(self, name)
        return range(start, end)

    def size(self, name: str) -> int:
        start, end = getattr(self, name)
        return end - start

    def path1(self) -> list[int]:
        """Packed positions of path 1, [A, C, D, E] (C, D and E are contiguous)."""
        return [*range(0, self.a[1]), *range(self.c[0], self.e[1])]

    def path2(self) -> list[int]:
        """Packed positions of path 2, [A, B, D, F]."""
        return [*range(0, self.a[1]), *self.span("b"), *self.span("d"), *self.span("f")]


def segments_of(layout: torch.Tensor) -> list[Segments]:
    """The `Segments` of every sample of a layout [batch, 6, 2] (no validation)."""
    return [Segments.from_bounds(sample) for sample in layout.cpu()]


def segment_bounds(sizes) -> list[list[int]]:
    """[[start, end]] of consecutive segments of the given sizes, starting at 0 (one sample's
    layout rows from |A|..|F|)."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append([start, start + size])
        start += size
    return bounds


def validate_layout(layout, batch: int, length: int, op: str = "crystal_ext") -> list[Segments]:
    """Check a layout against the rules of docs/method.md and return its `Segments`, one per
    sample. Raises ValueError naming `layout` and the broken rule."""
    if not isinstance(layout, torch.Tensor):
        raise ValueError(f"{op}: layout must be a torch.Tensor, got {type(layout).__name__}")
    if layout.dtype != torch.int64:
        raise ValueError(f"{op}: layout must be int64 (torch.long), got {layout.dtype}")
    if layout.dim() != 3 or tuple(layout.shape) != (batch, 6, 2):
        raise ValueError(
            f"{op}: layout must have shape [batch={batch}, 6, 2] ((start, end) of segments "
            f"A..F), got {list(layout.shape)}"
        )
    samples = segments_of(layout)
    for b, seg in enumerate(samples):
        spans = [getattr(seg, name) for name in "abcdef"]
        if seg.a[0] != 0:
            raise ValueError(f"{op}: layout[{b}]: segment A must start at 0, got start {seg.a[0]}")
        for s, (start, end) in enumerate(spans):
            if start > end:
                raise ValueError(
                    f"{op}: layout[{b}]: segment {SEGMENT_NAMES[s]} has start {start} > end {end}"
                )
            if s < 5 and end != spans[s + 1][0]:
                raise ValueError(
                    f"{op}: layout[{b}]: segments must be contiguous end to end, but "
                    f"{SEGMENT_NAMES[s]} ends at {end} and {SEGMENT_NAMES[s + 1]} starts at "
                    f"{spans[s + 1][0]}"
                )
        if seg.end > length:
            raise ValueError(
                f"{op}: layout[{b}]: segment F ends at {seg.end}, beyond the sequence length "
                f"{length} of q and k"
            )
        if seg.size("b") != seg.size("c"):
            raise ValueError(
                f"{op}: layout[{b}]: |B| must equal |C| (both paths see the same prompt), got "
                f"|B|={seg.size('b')} and |C|={seg.size('c')}"
            )
        if seg.size("d") < 1:
            raise ValueError(
                f"{op}: layout[{b}]: segment D (latent block) is empty; at least one latent token is needed"
            )
        if seg.size("e") < 1:
            raise ValueError(
                f"{op}: layout[{b}]: segment E (answer) is empty; at least one answer token is needed"
            )
        if seg.size("f") != seg.size("e"):
            raise ValueError(
                f"{op}: layout[{b}]: |E| must equal |F| (F copies the answer), got "
                f"|E|={seg.size('e')} and |F|={seg.size('f')}"
            )
    return samples


@dataclass(frozen=True, eq=False)
class CheckedLayout:
    """A layout that passed `validate_layout` for a sequence of `length` positions: its host copy
    and its `Segments`. Made by `check_layout` only. The objective checks a batch's layout once and
    hands this value on to the text layers (crystal_ext.model.attention_registration), which then
    neither read nor check the layout again."""

    source: torch.Tensor  # the layout as it was given (any device)
    host: torch.Tensor  # its copy on the CPU
    segments: tuple[Segments, ...]
    length: int

    @property
    def batch(self) -> int:
        return len(self.segments)

    def describes(self, layout, batch: int, length: int) -> bool:
        """Whether this is the check of `layout` (the same tensor) for a [batch, length] sequence."""
        return layout is self.source and (batch, length) == (self.batch, self.length)


def check_layout(layout, batch: int, length: int, op: str = "crystal_ext") -> CheckedLayout:
    """`validate_layout` on the layout's host copy (read once), kept with it as a CheckedLayout."""
    host = layout.to("cpu") if isinstance(layout, torch.Tensor) else layout
    return CheckedLayout(layout, host, tuple(validate_layout(host, batch, length, op)), length)


def copy_to_device(host: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Host int64 index tensors on `device`. To a GPU they travel as one pinned buffer with one
    asynchronous copy, so building them never waits for the work already queued there."""
    if device.type != "cuda":
        return tuple(t.to(device) for t in host)
    flat = torch.cat([t.reshape(-1) for t in host]).pin_memory()
    on_device = flat.to(device, non_blocking=True)
    return tuple(part.view(t.shape) for part, t in zip(on_device.split([t.numel() for t in host]), host))


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
