r"""The index plan of the fused LM-head losses: everything `lm_head_losses` reads from its
index arguments (targets, teacher_rows, student_rows, pair_sample, topk_fraction), checked and
built once on the host and moved to the compute device in one pinned, asynchronous copy.

With a plan the op reads no index value on the host: on a GPU neither its forward nor its
backward waits for the device (the per-sample top-k selection runs on the device too, from
`sample_pairs`, `sample_k` and `kept_slots`). A caller that has its index tensors on the host
(crystal_ext.model.objective) builds the plan there, once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

import crystal_ext.ops._extension as _extension
from crystal_ext.ops.layout import IGNORE, copy_to_device

_NAME = "lm_head_losses"


class PlanTensors(NamedTuple):
    """The plan's index tensors (int64, on the compute device), in the order of the op schema's
    `Tensor[] plan` argument: the one list of them on the Python side, checked against the
    kernels' list (csrc/lm_head_plan.h) when the extension loads. A fake kernel or an autograd
    formula reads the op's list with `PlanTensors(*plan)`.

    rows          [R]: the rows of hidden that need logits, each once: every row of a pair
                  first (in order of first appearance, teacher before student), then the other
                  targeted rows in increasing order
    row_targets   [R]: their targets (-100: no cross entropy on that row)
    ce_rows       [T]: positions in `rows` of the targeted rows (T rows enter the mean CE)
    pair_rows     [2, M]: positions in `rows` of each pair's teacher (0) and student (1)
    sample_pairs  [S, W]: the pairs of each sample (samples in increasing label order), in
                  pair order, padded with -1; W is the largest pair count of a sample
    sample_k      [S]: pairs kept per sample, k = max(1, int(topk_fraction * pairs))
    kept_slots    [K]: flat positions s * W + j, j < k_s, of the kept ranks (K = sum k_s)
    """

    rows: torch.Tensor
    row_targets: torch.Tensor
    ce_rows: torch.Tensor
    pair_rows: torch.Tensor
    sample_pairs: torch.Tensor
    sample_k: torch.Tensor
    kept_slots: torch.Tensor


if _extension.extension_available():
    _extension.register_plan(_NAME, PlanTensors._fields)


@dataclass(frozen=True)
class LmHeadPlan:
    """The op's plan: its index tensors and the sizes they were built for.

    tensors       the op's `plan` argument (PlanTensors)
    paired_rows   tensors.rows[:paired_rows] are the paired rows (the kernels keep them in one
                  chunk); the op's `paired_rows` argument
    """

    tensors: PlanTensors
    paired_rows: int
    n_rows: int
    vocab: int
    topk_fraction: float

    @property
    def device(self) -> torch.device:
        return self.tensors.rows.device


def _index(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{_NAME}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{_NAME}: {name} must be 1-D, got shape {list(t.shape)}")
    if t.dtype != torch.long:
        raise ValueError(f"{_NAME}: {name} must be int64 (torch.long), got {t.dtype}")
    return t.to("cpu")


def _first_bad(bad: torch.Tensor) -> int | None:
    where = bad.nonzero()
    return int(where[0, 0]) if where.numel() else None


def lm_head_plan(
    targets: torch.Tensor,
    teacher_rows: torch.Tensor,
    student_rows: torch.Tensor,
    pair_sample: torch.Tensor,
    topk_fraction: float,
    n_rows: int,
    vocab: int,
    device: torch.device | str,
) -> LmHeadPlan:
    """Check the index arguments of lm_head_losses and build its plan on `device`.

    Args: as crystal_ext.lm_head_losses (targets [N], teacher_rows / student_rows / pair_sample
        [M], topk_fraction); n_rows = N, the rows of hidden; vocab = V, the rows of the weight;
        device: hidden's device. The index tensors are read on the host (tensors on a GPU are
        copied back first, which waits for it: pass host copies when there are some).

    Raises ValueError naming the argument for a wrong shape, dtype or value.
    """
    _extension.require_fused(_NAME)
    targets = _index(targets, "targets")
    teacher = _index(teacher_rows, "teacher_rows")
    student = _index(student_rows, "student_rows")
    sample = _index(pair_sample, "pair_sample")
    topk_fraction = float(topk_fraction)
    _check_values(targets, teacher, student, sample, topk_fraction, int(n_rows), vocab)
    rows, row_targets, ce_rows, pair_rows, paired_rows = _logit_rows(targets, teacher, student)
    sample_pairs, sample_k, kept_slots = _kept_ranks(sample, topk_fraction)
    host = PlanTensors(rows, row_targets, ce_rows, pair_rows, sample_pairs, sample_k, kept_slots)
    return LmHeadPlan(
        PlanTensors(*copy_to_device(host, torch.device(device))),
        paired_rows=paired_rows,
        n_rows=int(n_rows),
        vocab=int(vocab),
        topk_fraction=topk_fraction,
    )


def _check_values(targets, teacher, student, sample, topk_fraction: float, n: int, vocab: int) -> None:
    """The index arguments' sizes and values (host tensors); errors name the argument."""
    m = teacher.numel()
    if targets.numel() != n:
        raise ValueError(f"{_NAME}: targets has {targets.numel()} entries but hidden has {n} rows")
    for name, t in (("student_rows", student), ("pair_sample", sample)):
        if t.numel() != m:
            raise ValueError(
                f"{_NAME}: {name} has {t.numel()} entries but teacher_rows has {m} (one entry per pair in each)"
            )
    if not (0.0 < topk_fraction <= 1.0):  # also false for NaN
        raise ValueError(f"{_NAME}: topk_fraction must lie in (0, 1], got {topk_fraction}")
    bad = _first_bad((targets != IGNORE) & ((targets < 0) | (targets >= vocab)))
    if bad is not None:
        raise ValueError(
            f"{_NAME}: targets[{bad}] = {int(targets[bad])} is outside [0, vocab={vocab}) and is "
            f"not the ignore index -100"
        )
    for name, t in (("teacher_rows", teacher), ("student_rows", student)):
        bad = _first_bad((t < 0) | (t >= n))
        if bad is not None:
            raise ValueError(f"{_NAME}: {name}[{bad}] = {int(t[bad])} is not a row of hidden (N={n})")


def _logit_rows(targets, teacher, student) -> tuple:
    """Rows needing logits: the paired rows in order of first appearance, then the other CE
    rows. Returns (rows, row_targets, ce_rows, pair_rows, paired_rows)."""
    n, m = targets.numel(), teacher.numel()
    appearance = torch.stack([teacher, student], dim=1).flatten()
    first = torch.full((n,), 2 * m, dtype=torch.long)
    first.scatter_reduce_(0, appearance, torch.arange(2 * m), reduce="amin")
    paired = (first < 2 * m).nonzero().flatten()
    paired = paired[first[paired].argsort()]
    others = ((targets != IGNORE) & (first == 2 * m)).nonzero().flatten()
    rows = torch.cat([paired, others])
    local = torch.full((n,), -1, dtype=torch.long)
    local[rows] = torch.arange(rows.numel())
    row_targets = targets[rows]
    ce_rows = (row_targets != IGNORE).nonzero().flatten()
    pair_rows = torch.stack([local[teacher], local[student]])
    return rows, row_targets, ce_rows, pair_rows, int(paired.numel())


def _kept_ranks(sample, topk_fraction: float) -> tuple:
    """Samples (in increasing label order), the place of each pair among its sample's pairs and
    the ranks kept per sample. Returns (sample_pairs, sample_k, kept_slots)."""
    m = sample.numel()
    labels, which = torch.unique(sample, sorted=True, return_inverse=True)
    counts = torch.bincount(which, minlength=labels.numel())
    width = int(counts.max()) if m else 0
    order = torch.argsort(which, stable=True)
    starts = counts.cumsum(0) - counts
    slot = torch.empty(m, dtype=torch.long)
    slot[order] = torch.arange(m) - starts[which[order]]
    sample_pairs = torch.full((labels.numel(), width), -1, dtype=torch.long)
    sample_pairs[which, slot] = torch.arange(m)
    ks = [max(1, int(topk_fraction * c)) for c in counts.tolist()]
    sample_k = torch.tensor(ks, dtype=torch.long)
    kept_slots = torch.cat(
        [torch.arange(k) + s * width for s, k in enumerate(ks)] or [torch.zeros(0, dtype=torch.long)]
    )
    return sample_pairs, sample_k, kept_slots
