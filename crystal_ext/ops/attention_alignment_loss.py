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
"""

from __future__ import annotations

import torch

import crystal_ext.ops._extension as _extension

_OP = "crystal_ext::attention_alignment_loss_fwd"


def attention_alignment_loss(
    q: torch.Tensor, k: torch.Tensor, layout: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """CrystaL attention-alignment loss from the last layer's rotated queries and keys.

    Args:
        q: [batch, heads, length, head_dim], float32 / bfloat16 / float16 (float64 for tests).
        k: [batch, kv_heads, length, head_dim], same dtype and device; heads % kv_heads == 0.
        layout: int64 [batch, 6, 2], (start, end) of segments A..F (crystal_ext.ops.layout), on
            the CPU or on q's device.
        scale: softmax scale, default head_dim ** -0.5.

    Returns:
        Scalar loss in float32 (float64 for float64 inputs), differentiable w.r.t. q and k.
    """
    _extension.require_fused("attention_alignment_loss", q, k)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(
            "attention_alignment_loss: q must be 4-D [batch, heads, length, head_dim], got "
            f"{getattr(q, 'shape', type(q).__name__)}"
        )
    # Device checks before dispatch: a layout on another device would otherwise pick that
    # device's kernel (or the fake kernel, for "meta") instead of failing.
    if isinstance(k, torch.Tensor) and k.device != q.device:
        raise RuntimeError(
            f"attention_alignment_loss: k must be on the device of q ({q.device}), got {k.device}"
        )
    if isinstance(layout, torch.Tensor) and layout.device.type != "cpu" and layout.device != q.device:
        raise RuntimeError(
            "attention_alignment_loss: layout must be on the CPU or on the device of q "
            f"({q.device}), got {layout.device}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    loss, _lse = torch.ops.crystal_ext.attention_alignment_loss_fwd(q, k, layout, float(scale))
    return loss


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


if _extension.extension_available():

    @torch.library.register_fake(_OP)
    def _forward_fake(q, k, layout, scale):
        acc = _accumulate_dtype(q.dtype)
        batch, heads, length, _ = q.shape
        return q.new_empty((), dtype=acc), q.new_empty((batch, heads, length), dtype=acc)

    @torch.library.register_fake("crystal_ext::attention_alignment_loss_bwd")
    def _backward_fake(grad_loss, q, k, layout, lse, scale):
        # Contiguous, like the real kernels' outputs (q is often a transposed view).
        return q.new_empty(q.shape), k.new_empty(k.shape)

    def _setup_context(ctx, inputs, output):
        q, k, layout, scale = inputs
        _loss, lse = output
        ctx.save_for_backward(q, k, layout, lse)
        ctx.scale = scale

    def _backward(ctx, grad_loss, _grad_lse):
        q, k, layout, lse = ctx.saved_tensors
        grad_q, grad_k = torch.ops.crystal_ext.attention_alignment_loss_bwd(
            grad_loss, q, k, layout, lse, ctx.scale
        )
        return grad_q, grad_k, None, None

    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
