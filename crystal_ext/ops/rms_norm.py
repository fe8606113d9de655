r"""Fused RMSNorm (transformers' Llama / Qwen2 RMSNorm), as a torch custom op, CPU only.

Maths, per row x of the last dimension H (in float32; float64 for float64 inputs):

  rstd = 1 / sqrt(mean(x^2) + eps),   n = x * rstd,   y = weight * round(n)

with round() to x's dtype and the product rounded again, as the stock module computes it
(`weight * hidden.to(input_dtype)`). Backward, treating the roundings as the identity as
autograd does:

  d weight = sum over rows of g * round(n),   d x = rstd * (g weight - n * mean(g weight n)).

Why a kernel: the stock module is ten elementwise passes over the activations forward and
backward; on a CPU they cost more than a decoder layer's attention (a Qwen-7B block of 787 rows
x 3,584 in bf16: 15 ms forward + backward, 2.3 ms fused). On a GPU the field's fused norms
(torch.compile, Liger-Kernel) already do this, so there is no CUDA kernel: the module fusion
(crystal_ext.model.rms_norm_fusion) runs the stock forward there.
"""

from __future__ import annotations

import torch

import crystal_ext.ops._extension as _extension

_OP = "crystal_ext::rms_norm_fwd"
_NAME = "rms_norm"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype), differentiable w.r.t. x and
    weight.

    Args:
        x: [..., H] on the CPU, float32 / bfloat16 / float16 (float64 for tests).
        weight: [H], x's dtype and device.
        eps: >= 0, added to the mean square.

    Returns:
        y, x's shape and dtype.
    """
    for name, value in (("x", x), ("weight", weight)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{_NAME}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x.device.type != "cpu":
        raise RuntimeError(f"{_NAME}: x must be on the CPU (there is no GPU kernel), got {x.device}")
    _extension.require_fused(_NAME)
    y, _rstd = torch.ops.crystal_ext.rms_norm_fwd(x, weight, float(eps))
    return y


if _extension.extension_available():

    @torch.library.register_fake(_OP)
    def _forward_fake(x, weight, eps):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=acc)

    @torch.library.register_fake("crystal_ext::rms_norm_bwd")
    def _backward_fake(grad_y, x, weight, rstd, weight_grad):
        return torch.empty_like(x), weight.new_empty(weight.shape if weight_grad else (0,))

    def _setup_context(ctx, inputs, output):
        x, weight, _eps = inputs
        _y, rstd = output
        ctx.save_for_backward(x, weight, rstd)

    def _backward(ctx, grad_y, _grad_rstd):
        x, weight, rstd = ctx.saved_tensors
        weight_grad = ctx.needs_input_grad[1]
        grad_x, grad_weight = torch.ops.crystal_ext.rms_norm_bwd(grad_y, x, weight, rstd, weight_grad)
        return grad_x, grad_weight if weight_grad else None, None

    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
