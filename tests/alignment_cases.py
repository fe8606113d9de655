"""Layouts and inputs shared by the attention-alignment tests and benchmarks."""

from __future__ import annotations

import torch

from crystal_ext.ops.layout import segment_bounds


def make_layout(samples: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """Layout [batch, 6, 2] from (|A|, |B| = |C|, |D|, |E| = |F|) per sample."""
    rows = [segment_bounds([a, bc, bc, d, e, e]) for a, bc, d, e in samples]
    return torch.tensor(rows, dtype=torch.long)


def needed_length(samples) -> int:
    return max(a + 2 * bc + d + 2 * e for a, bc, d, e in samples)


def random_qk(
    batch, heads, kv_heads, length, head_dim, dtype=torch.float32, device="cpu", seed=0, spread=1.0
):
    """Queries and keys like a trained model's: some spread in the scores, so softmaxes are
    neither uniform nor one-hot."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, generator=gen, dtype=torch.float64) * spread
    k = torch.randn(batch, kv_heads, length, head_dim, generator=gen, dtype=torch.float64) * spread
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


# Several samples of different lengths, padding after F, |D| = 1 and |E| = 1 included.
MIXED_SAMPLES = [(3, 11, 2, 5), (0, 7, 1, 1), (5, 13, 4, 3)]
