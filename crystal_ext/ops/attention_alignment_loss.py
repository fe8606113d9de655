r"""Fused attention-alignment loss (CrystaL's loss_attn), as a torch custom op.

Maths, for one sample with segments A..F (crystal_ext.ops.layout) and H query heads:

  s_{h,r,c} = scale * q_{h,r} . k_{h // (H/Hkv), c}           for keys c visible from row r
  p_{h,r,c} = exp(s_{h,r,c} - lse_{h,r}),  lse_{h,r} = log sum_{c visible} exp(s_{h,r,c})
  m_{r,c}   = (1/H) sum_h p_{h,r,c}                              for c in D
  T_i = m_{E_i} / (sum_D m_{E_i} + 1e-8)   (detached),   S_i = m_{F_i} / (sum_D m_{F_i} + 1e-8)
  loss      = (1/|E|) sum_i sum_{c in D} T_{i,c} (log T_{i,c} - log S_{i,c})

and the op returns the mean of the per-sample losses. Only the |E| + |F| aligned rows are
computed: the kernel recomputes their log-sum-exp over their whole visible key set instead of
touching the L x L matrix, and never repeats k across grouped heads.

Backward, with G_{i,c} = dloss/dm_{F_i,c} = (1/|E|)(-T_{i,c}/m_{F_i,c} + (sum_c T_{i,c})/(sum_D m + eps)):
  dloss/dp_{h,F_i,c} = G_{i,c} / H on latent keys (0 elsewhere),
  dloss/ds = p (dloss/dp - sum_c p dloss/dp),  dq = scale * ds k,  dk = scale * ds^T q,
reaching q of the F rows and k of the keys they see (A, B, D, F); nothing flows through E.

The forward saves the aligned rows' log-sum-exp ([B, H, L], zero elsewhere), so the backward
only recomputes the student rows' scores.

The kernels read the layout's rows and keys from index tensors built once per layout on the
compute device (`alignment_indices`, `AlignmentIndices`): the op itself reads no value on the
host, so on a GPU neither direction waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

import crystal_ext.ops._extension as _extension
from crystal_ext.ops.layout import copy_to_device

_OP = "crystal_ext::attention_alignment_loss_fwd"
_NAME = "attention_alignment_loss"


class AlignmentPlanTensors(NamedTuple):
    """The op's index tensors (int64, on the compute device), in the order of its schema's
    `Tensor[] plan` argument: the one list of them on the Python side, checked against the
    kernels' list (csrc/attention_alignment_plan.h) when the extension loads.

    layout          [batch, 6, 2], the validated layout
    answer_rows     [2, batch, max |E|]: packed rows of E (path 0) and F (path 1)
    intact_keys     [batch, max keys]: keys of the intact path, [A, C, D, E]
    corrupted_keys  [batch, max keys]: keys of the corrupted path, [A, B, D, F]
    latent_keys     [batch, max |D|]: the latent keys D
    Rows are padded at the end with position 0 (never an aligned row; the kernels mask
    padding by the layout), so the widths are the batch maxima the kernels size their work by.
    """

    layout: torch.Tensor
    answer_rows: torch.Tensor
    intact_keys: torch.Tensor
    corrupted_keys: torch.Tensor
    latent_keys: torch.Tensor


if _extension.extension_available():
    _extension.register_plan(_NAME, AlignmentPlanTensors._fields)


@dataclass(frozen=True)
class AlignmentIndices:
    """Everything the op reads from a layout, made once per layout on the compute device, so
    that neither direction of the op reads a value on the host (on a GPU: no synchronisation).

    tensors  the op's `plan` argument (AlignmentPlanTensors)
    length   the sequence length they were built for
    """

    tensors: AlignmentPlanTensors
    length: int

    @property
    def device(self) -> torch.device:
        return self.tensors.layout.device


def alignment_indices(layout: torch.Tensor, length: int, device: torch.device | str) -> AlignmentIndices:
    """Check a layout's values and build the op's index tensors on `device` (on a GPU with one
    pinned, asynchronous host-to-device copy, so building them never waits for the device).

    Args:
        layout: int64 [batch, 6, 2]; read on the host (a layout on a GPU is copied back first,
            which waits for it: pass the host copy when there is one).
        length: the sequence length L of q and k.
        device: the compute device (q's).

    Raises ValueError naming `layout` and the broken rule for an invalid layout.
    """
    _extension.require_fused(_NAME)
    if not isinstance(layout, torch.Tensor):
        raise ValueError(f"{_NAME}: layout must be a torch.Tensor, got {type(layout).__name__}")
    layout = layout.to("cpu")
    host = (layout.contiguous(), *torch.ops.crystal_ext.attention_alignment_indices(layout, int(length)))
    return AlignmentIndices(
        AlignmentPlanTensors(*copy_to_device(host, torch.device(device))), length=int(length)
    )


def attention_alignment_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: torch.Tensor | AlignmentIndices,
    scale: float | None = None,
) -> torch.Tensor:
    """CrystaL attention-alignment loss from the last layer's rotated queries and keys.

    Args:
        q: [batch, heads, length, head_dim], float32 / bfloat16 / float16 (float64 for tests).
        k: [batch, kv_heads, length, head_dim], same dtype and device; heads % kv_heads == 0.
        layout: int64 [batch, 6, 2], (start, end) of segments A..F (crystal_ext.ops.layout), on
            the CPU or on q's device; or its `AlignmentIndices` (alignment_indices(layout,
            length, q.device)), which a caller that reuses a layout builds once: with those the
            op does no host work and, on a GPU, never waits for the device.
        scale: softmax scale, default head_dim ** -0.5.

    Returns:
        Scalar loss in float32 (float64 for float64 inputs), differentiable w.r.t. q and k.
    """
    _extension.require_fused(_NAME, q, k)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(
            f"{_NAME}: q must be 4-D [batch, heads, length, head_dim], got "
            f"{getattr(q, 'shape', type(q).__name__)}"
        )
    # Device checks before dispatch: a tensor on another device would otherwise pick that
    # device's kernel (or the fake kernel, for "meta") instead of failing.
    if isinstance(k, torch.Tensor) and k.device != q.device:
        raise RuntimeError(f"{_NAME}: k must be on the device of q ({q.device}), got {k.device}")
    if isinstance(layout, AlignmentIndices):
        indices = layout
        if indices.device != q.device or indices.length != q.shape[2]:
            raise ValueError(
                f"{_NAME}: layout (AlignmentIndices) was built for length {indices.length} on "
                f"{indices.device}, but q is {list(q.shape)} on {q.device}"
            )
    else:
        if isinstance(layout, torch.Tensor) and layout.device.type != "cpu" and layout.device != q.device:
            raise RuntimeError(
                f"{_NAME}: layout must be on the CPU or on the device of q ({q.device}), got {layout.device}"
            )
        indices = alignment_indices(layout, q.shape[2], q.device)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    loss, _lse = torch.ops.crystal_ext.attention_alignment_loss_fwd(q, k, list(indices.tensors), float(scale))
    return loss


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _extension.extension_available():

    @torch.library.register_fake(_OP)
    def _forward_fake(q, k, plan, scale):
        acc = _accumulate_dtype(q.dtype)
        batch, heads, length, _ = q.shape
        return q.new_empty((), dtype=acc), q.new_empty((batch, heads, length), dtype=acc)

    @torch.library.register_fake("crystal_ext::attention_alignment_loss_bwd")
    def _backward_fake(grad_loss, q, k, plan, lse, scale):
        # In the strides of q and k, like the real kernels' outputs (q is often a transposed view).
        return torch.empty_like(q), torch.empty_like(k)

    def _setup_context(ctx, inputs, output):
        q, k, plan, scale = inputs
        _loss, lse = output
        ctx.save_for_backward(q, k, lse, *plan)
        ctx.scale = scale

    def _backward(ctx, grad_loss, _grad_lse):
        q, k, lse, *plan = ctx.saved_tensors
        grad_q, grad_k = torch.ops.crystal_ext.attention_alignment_loss_bwd(
            grad_loss, q, k, plan, lse, ctx.scale
        )
        # q, k, plan (one None per tensor), scale
        return grad_q, grad_k, [None] * len(plan), None

    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
