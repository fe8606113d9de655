"""The `rms_norm` fusion: RMSNorm modules of the Llama / Qwen2 form run the fused CPU kernel
(crystal_ext.ops.rms_norm) in place of their ten elementwise passes.

Which modules: the classes in FUSABLE_RMS_NORMS, each one's forward being transformers'

    hidden = x.to(float32); hidden = hidden * rsqrt(hidden.pow(2).mean(-1) + eps)
    return weight * hidden.to(x.dtype)

(Gemma's `1 + weight`, Qwen3.5's and GLM's gated norms and every other form keep their modules).
A fused module runs the kernel only where it pays and is exact to the stock forward's rounding:
a plain CPU tensor in bfloat16 or float32 with a weight of the same dtype; anything else (a GPU,
float16, float64, a mixed-dtype weight, a DTensor) runs the stock forward. (The stock forward
computes a float64 input in float32; the kernel would compute it in float64.)

Without the compiled extension (a baseline run with the plain-PyTorch references) models are
built with the stock norms.

`check_fused_rms_norms` proves the fusion on the user's own model when it is built: each fused
class's forward is compared with its stock forward on the model's own weights, and a difference
beyond one rounding of the dtype refuses the model (a transformers release that changed the
norm would otherwise train on another norm silently).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types

import torch

# The modeling module of each fusable class, by class name.
FUSABLE_RMS_NORMS = {
    "LlamaRMSNorm": "transformers.models.llama.modeling_llama",
    "Qwen2RMSNorm": "transformers.models.qwen2.modeling_qwen2",
    "Qwen2VLRMSNorm": "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "Qwen2_5_VLRMSNorm": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "Qwen3RMSNorm": "transformers.models.qwen3.modeling_qwen3",
    "Qwen3VLTextRMSNorm": "transformers.models.qwen3_vl.modeling_qwen3_vl",
    "Qwen3VLMoeTextRMSNorm": "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
    "Glm4vRMSNorm": "transformers.models.glm4v.modeling_glm4v",
    "Lfm2RMSNorm": "transformers.models.lfm2.modeling_lfm2",
}
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def runs_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a fused norm runs the kernel on x (else its stock forward)."""
    return (
        type(x) is torch.Tensor
        and isinstance(weight, torch.Tensor)
        and type(weight.data) is torch.Tensor
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype in _KERNEL_DTYPES
        and weight.dtype == x.dtype
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[-1]
    )


class _FusedRMSNormMixin:
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if runs_kernel(hidden_states, self.weight):
            from crystal_ext.ops.rms_norm import rms_norm

            return rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return super().forward(hidden_states)


_FUSED_CLASSES: dict[type, type] = {}


def fused_class(stock_class: type) -> type:
    """The fused subclass of a stock RMSNorm class (one per class, so isinstance still holds)."""
    if stock_class not in _FUSED_CLASSES:
        _FUSED_CLASSES[stock_class] = type(
            f"Fused{stock_class.__name__}", (_FusedRMSNormMixin, stock_class), {}
        )
    return _FUSED_CLASSES[stock_class]


def _stock_classes() -> list[type]:
    """The fusable classes that this transformers has."""
    classes = []
    for name, module_name in FUSABLE_RMS_NORMS.items():
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            continue
        classes.append(_stock_of(cls) if issubclass(cls, _FusedRMSNormMixin) else cls)  # inside a build
    return classes


@contextlib.contextmanager
def fused_rms_norm_classes():
    """Inside, every transformers module's name for a fusable class names its fused class, so
    models built here get fused norms. transformers.monkey_patching.apply_patches does this by
    name alone; this replaces only names bound to the fusable class itself (another module's
    class of the same name keeps its own forward)."""
    global _depth
    from crystal_ext.ops._extension import extension_available

    if not extension_available():  # the baseline without the extension keeps the stock norms
        yield
        return
    stocks = _stock_classes()
    if _depth == 0:
        _rebind(stocks, to_fused=True)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            # Also a module imported inside (one that imported a fusable class by name) gets
            # the stock class back.
            _rebind(stocks, to_fused=False)


_depth = 0  # how many fused_rms_norm_classes contexts are open (a nested one changes nothing)


def _rebind(stocks: list[type], to_fused: bool) -> None:
    for stock in stocks:
        fused = fused_class(stock)
        old, new = (stock, fused) if to_fused else (fused, stock)
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("transformers") and (
                getattr(module, stock.__name__, None) is old
            ):
                setattr(module, stock.__name__, new)


def is_fused_rms_norm(module) -> bool:
    return isinstance(module, _FusedRMSNormMixin)


def _stock_of(fused: type) -> type:
    return fused.__mro__[2]  # (Fused<class>, the mixin, <class>, ...)


def stock_class_of(module) -> type:
    """The stock class a fused norm was made from."""
    return _stock_of(type(module))


def fused_rms_norms(model) -> dict:
    """The fused norms of `model`, by name."""
    return {name: m for name, m in model.named_modules() if is_fused_rms_norm(m)}


def check_fused_rms_norms(model) -> None:
    """Compare each fused norm class of `model` with its stock forward on one of its modules'
    own weights (in the model's dtype where the kernel runs on it, and in float32); raise
    ValueError naming the class when they differ by more than one rounding of the dtype."""
    checked = set()
    for name, module in fused_rms_norms(model).items():
        stock = stock_class_of(module)
        weight = module.weight.detach()
        if stock in checked or weight.device.type == "meta":
            continue
        checked.add(stock)
        weight = weight.to("cpu")
        dtypes = {weight.dtype, torch.float32} & set(_KERNEL_DTYPES)
        for dtype in sorted(dtypes, key=str):
            _compare_with_stock(name, module, stock, weight.to(dtype))


def _compare_with_stock(name: str, module, stock: type, weight: torch.Tensor) -> None:
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(4, weight.shape[-1], generator=generator, dtype=torch.float32) * 3).to(weight.dtype)
    probe = types.SimpleNamespace(weight=weight, variance_epsilon=module.variance_epsilon)
    with torch.no_grad():
        want = stock.forward(probe, x)
        got = _fused_forward(probe, x)
    # One rounding of the dtype, relative, plus that of the largest output near zero.
    eps = torch.finfo(weight.dtype).eps
    atol = 2 * eps * (weight.abs().max().item() * 3 + 1)
    if want.dtype != got.dtype or not torch.allclose(got, want, rtol=2 * eps, atol=atol):
        raise ValueError(
            f"the fused RMSNorm differs from {stock.__module__}.{stock.__name__}.forward on "
            f"module {name!r} ({weight.dtype}): this transformers computes the norm another way. "
            f"Refusing to train on a different norm; report it with your transformers version."
        )


def _fused_forward(probe, x):
    from crystal_ext.ops.rms_norm import rms_norm

    return rms_norm(x, probe.weight, probe.variance_epsilon)


__all__ = [
    "FUSABLE_RMS_NORMS",
    "check_fused_rms_norms",
    "fused_class",
    "fused_rms_norms",
    "is_fused_rms_norm",
    "fused_rms_norm_classes",
    "runs_kernel",
    "stock_class_of",
]
