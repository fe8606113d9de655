"""The LM-head forward's outputs as empty tensors of the right shapes and dtypes: the fake kernels
of lm_head_losses_fwd (crystal_ext.ops.lm_head_losses) and of the override op
(crystal_ext.ops.override_rows), which both import it from here.
"""

from __future__ import annotations

import torch


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward_outputs_fake(hidden: torch.Tensor, n_pairs: int, grad_hidden: bool) -> tuple[torch.Tensor, ...]:
    """Empty tensors shaped like the forward's outputs (ce, kl, d ce / d hidden, d kl / d hidden,
    lse, pair coefficients): the fake kernel of lm_head_losses_fwd and of the override op."""
    acc = _accumulate_dtype(hidden.dtype)
    grad_shape = tuple(hidden.shape) if grad_hidden else (0,)
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty((), dtype=acc),
        hidden.new_empty(grad_shape, dtype=acc),
        hidden.new_empty(grad_shape, dtype=acc),
        hidden.new_empty((hidden.shape[0],), dtype=acc),
        hidden.new_empty((n_pairs,), dtype=acc),
    )
