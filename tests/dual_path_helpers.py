"""Shared helpers of the dual-path tests: random layouts obeying the rules of docs/method.md."""

from __future__ import annotations

import random

import torch

from crystal_ext.ops.layout import segment_bounds


def random_layout(batch: int, rng: random.Random, max_seg: int = 6, pad: int = 3):
    """A random valid layout [batch, 6, 2] and the padded length it needs.

    Sizes: |A| >= 0, |B| = |C| >= 0, |D| >= 1, |E| = |F| >= 1; each sample padded by up to
    `pad` positions beyond the longest sample.
    """
    rows, ends = [], []
    for _ in range(batch):
        a, bc, d, e = (
            rng.randint(0, max_seg),
            rng.randint(0, max_seg),
            rng.randint(1, 4),
            rng.randint(1, max_seg),
        )
        row = segment_bounds([a, bc, bc, d, e, e])
        rows.append(row)
        ends.append(row[-1][1])
    length = max(ends) + rng.randint(0, pad)
    return torch.tensor(rows, dtype=torch.long), length
