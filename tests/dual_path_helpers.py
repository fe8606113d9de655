"""Shared helpers of the dual-path tests: random layouts obeying DESIGN.md section 2."""

from __future__ import annotations

import random

import torch


def random_layout(batch: int, rng: random.Random, max_seg: int = 6, pad: int = 3):
    """A random valid layout [batch, 6, 2] and the padded length it needs.

    Sizes: |A| >= 0, |B| = |C| >= 0, |D| >= 1, |E| = |F| >= 1; each sample padded by up to
    `pad` positions beyond the longest sample.
    """
    rows, ends = [], []
    for _ in range(batch):
        a, bc, d, e = rng.randint(0, max_seg), rng.randint(0, max_seg), rng.randint(1, 4), rng.randint(1, max_seg)
        sizes = [a, bc, bc, d, e, e]
        start, row = 0, []
        for s in sizes:
            row.append([start, start + s])
            start += s
        rows.append(row)
        ends.append(start)
    length = max(ends) + rng.randint(0, pad)
    return torch.tensor(rows, dtype=torch.long), length
