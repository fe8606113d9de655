"""The fused RMSNorm (crystal_ext.ops.rms_norm) against its plain-PyTorch reference and a float64
truth, and the `rms_norm` module fusion (crystal_ext.model.rms_norm_fusion) against the stock
transformers modules it replaces."""

from __future__ import annotations

import importlib

import pytest
import torch

import crystal_ext
from crystal_ext.model import rms_norm_fusion
from crystal_ext.ops import reference

pytestmark = pytest.mark.skipif(not crystal_ext.extension_available(), reason="needs the compiled extension")

# Odd widths, a width of one, the SIMD kernel's 16 lanes with and without a tail, a 7B width.
SHAPES = [(5, 7), (2, 3, 1003), (1, 33, 3584), (4, 16), (3, 1), (1, 9, 48)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(shape, dtype, seed=0, requires_grad=True):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype).requires_grad_(requires_grad)
    weight = (torch.randn(shape[-1], generator=generator) + 1).to(dtype).requires_grad_(requires_grad)
    grad = torch.randn(shape, generator=generator).to(dtype)
    return x, weight, grad


def _grads(fn, x, weight, grad, eps=1e-6):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = fn(x, weight, eps)
    y.backward(grad)
    return y.detach(), x.grad, weight.grad


def _error(got, truth, scale):
    """Largest error relative to the larger of the truth's largest value and `scale`, the size
    of the terms that cancel in it (a gradient near zero is a difference of larger terms)."""
    return ((got.double() - truth).abs().max() / max(truth.abs().max().item(), scale)).item()


@pytest.fixture(params=["simd", "generic"])
def kernel(request, monkeypatch):
    if request.param == "generic":
        monkeypatch.setenv("CRYSTAL_EXT_CPU_RMS_NORM_SIMD", "0")
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_the_reference_and_a_float64_truth(shape, dtype, kernel):
    x, weight, grad = _inputs(shape, dtype, seed=len(shape) * 7 + shape[-1])
    y, dx, dw = _grads(crystal_ext.ops.rms_norm, x, weight, grad)
    y_ref, dx_ref, dw_ref = _grads(reference.rms_norm, x, weight, grad)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    # The forward: the reference's values up to one rounding of the dtype (the mean square is
    # summed in another order: in float32 a few units in the last place).
    rtol = max(2 * torch.finfo(dtype).eps, 1e-5)
    atol = rtol * y_ref.float().abs().max().item()
    assert torch.allclose(y.float(), y_ref.float(), rtol=rtol, atol=atol), (y - y_ref).abs().max()
    # The gradients: no further from float64 than the reference's autograd.
    x64, w64, g64 = x.double(), weight.double(), grad.double()
    _, dx64, dw64 = _grads(reference.rms_norm, x64, w64, g64)
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    dx_scale = (g64 * w64 * rstd).abs().max().item()
    slack = 1e-6 if dtype == torch.float32 else 2e-3
    assert _error(dx, dx64, dx_scale) <= 1.5 * _error(dx_ref, dx64, dx_scale) + slack
    assert _error(dw, dw64, 0.0) <= 1.5 * _error(dw_ref, dw64, 0.0) + slack


def test_simd_and_generic_kernels_agree(monkeypatch):
    x, weight, grad = _inputs((2, 37, 3584), torch.bfloat16, seed=3)
    simd = _grads(crystal_ext.ops.rms_norm, x, weight, grad)
    monkeypatch.setenv("CRYSTAL_EXT_CPU_RMS_NORM_SIMD", "0")
    generic = _grads(crystal_ext.ops.rms_norm, x, weight, grad)
    for a, b in zip(simd, generic):
        # The same values up to the summation order of two row sums: at most one bf16 step.
        assert torch.allclose(a.float(), b.float(), rtol=2**-7, atol=2**-7 * a.float().abs().max())
    assert (simd[0] != generic[0]).float().mean() < 1e-3  # rarely even that


def test_gradcheck_float64():
    x, weight, _ = _inputs((3, 2, 11), torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda a, b: crystal_ext.ops.rms_norm(a, b, 1e-5), (x, weight))


def test_a_frozen_weight_gets_no_gradient_and_x_the_same_one():
    x, weight, grad = _inputs((4, 100), torch.bfloat16)
    _, dx_trained, _ = _grads(crystal_ext.ops.rms_norm, x, weight, grad)
    x = x.detach().requires_grad_()
    frozen = weight.detach()
    crystal_ext.ops.rms_norm(x, frozen, 1e-6).backward(grad)
    assert frozen.grad is None
    assert torch.equal(x.grad, dx_trained)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edge_values_follow_the_reference(dtype):
    x = torch.randn(6, 40).to(dtype)
    x[0] = 0  # rstd = 1 / sqrt(eps)
    x[1, 3] = float("inf")  # inf * 0 = nan, as the stock module gives
    x[2, 5] = float("-inf")
    x[3] = torch.finfo(dtype).max / 2  # the mean square overflows: y = 0
    x[4, 7] = float("nan")
    x[5] = torch.finfo(dtype).tiny
    weight = torch.randn(40).to(dtype)
    got = crystal_ext.ops.rms_norm(x, weight, 1e-6)
    want = reference.rms_norm(x, weight, 1e-6)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert torch.allclose(got[finite].float(), want[finite].float(), rtol=1e-2, atol=1e-6)


def test_opcheck():
    x, weight, _ = _inputs((3, 50), torch.float32)
    torch.library.opcheck(torch.ops.crystal_ext.rms_norm_fwd.default, (x, weight, 1e-6))


@pytest.mark.parametrize(
    ("args", "error", "names"),
    [
        ((torch.randn(3, 8), torch.randn(7), 1e-6), ValueError, "weight"),
        ((torch.randn(3, 8), torch.randn(8, dtype=torch.float64), 1e-6), ValueError, "weight"),
        ((torch.randn(3, 8), torch.randn(8), -1.0), ValueError, "eps"),
        ((torch.randn(3, 8), torch.randn(8), float("nan")), ValueError, "eps"),
        ((torch.randint(0, 3, (3, 8)), torch.randint(0, 3, (8,)), 1e-6), ValueError, "x"),
        ((torch.randn(3, 0), torch.randn(0), 1e-6), ValueError, "x"),
        (([1.0, 2.0], torch.randn(2), 1e-6), ValueError, "x"),
        ((torch.randn(3, 8, device="meta"), torch.randn(8, device="meta"), 1e-6), RuntimeError, "x"),
    ],
)
def test_bad_input_is_named(args, error, names):
    with pytest.raises(error, match=rf"rms_norm: {names}\b"):
        crystal_ext.ops.rms_norm(*args)


def test_bad_backward_input_is_named():
    x, weight, grad = _inputs((3, 8), torch.float32, requires_grad=False)
    _, rstd = torch.ops.crystal_ext.rms_norm_fwd(x, weight, 1e-6)
    with pytest.raises(ValueError, match=r"rms_norm: grad_y\b"):
        torch.ops.crystal_ext.rms_norm_bwd(grad[:2], x, weight, rstd, True)
    with pytest.raises(ValueError, match=r"rms_norm: rstd\b"):
        torch.ops.crystal_ext.rms_norm_bwd(grad, x, weight, rstd.double(), True)


# The module fusion.


def _stock_classes():
    classes = []
    for name, module_name in rms_norm_fusion.FUSABLE_RMS_NORMS.items():
        classes.append(getattr(importlib.import_module(module_name), name))
    return classes


def test_every_fusable_class_exists_in_this_transformers():
    assert len(_stock_classes()) == len(rms_norm_fusion.FUSABLE_RMS_NORMS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("stock_class", _stock_classes(), ids=lambda c: c.__name__)
def test_a_fused_norm_computes_what_its_stock_class_computes(stock_class, dtype):
    stock = stock_class(48, eps=1e-5).to(dtype)
    torch.nn.init.normal_(stock.weight)
    fused = rms_norm_fusion.fused_class(stock_class)(48, eps=1e-5).to(dtype)
    fused.load_state_dict(stock.state_dict())
    assert isinstance(fused, stock_class)
    x, _, grad = _inputs((2, 5, 48), dtype, seed=11)
    outputs = []
    for module in (stock, fused):
        xi = x.detach().requires_grad_()
        y = module(xi)
        y.backward(grad)
        outputs.append((y.detach(), xi.grad, module.weight.grad))
    eps = torch.finfo(dtype).eps
    for a, b in zip(*outputs):
        assert a.dtype == b.dtype
        assert torch.allclose(a.float(), b.float(), rtol=4 * eps, atol=4 * eps * a.abs().max().item())
    if dtype in (torch.float16, torch.float64):  # the stock forward itself runs
        assert all(torch.equal(a, b) for a, b in zip(*outputs))


def test_the_fused_norm_runs_the_kernel_only_where_it_is_exact(monkeypatch):
    op_module = importlib.import_module("crystal_ext.ops.rms_norm")
    calls = []

    real = op_module.rms_norm
    monkeypatch.setattr(op_module, "rms_norm", lambda *a: calls.append(a[0].dtype) or real(*a))
    stock_class = _stock_classes()[0]
    for dtype in (torch.bfloat16, torch.float32, torch.float16, torch.float64):
        rms_norm_fusion.fused_class(stock_class)(8).to(dtype)(torch.randn(2, 8).to(dtype))
    mixed = rms_norm_fusion.fused_class(stock_class)(8)  # float32 weight, bf16 input
    assert mixed(torch.randn(2, 8).to(torch.bfloat16)).dtype == torch.float32
    assert calls == [torch.bfloat16, torch.float32]


def test_a_model_built_by_crystal_ext_gets_fused_norms_and_saves_the_stock_checkpoint(tmp_path):
    from family_models import build

    model, _, _ = build("qwen2_5_vl")
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    norms = rms_norm_fusion.fused_rms_norms(model)
    assert norms and all(isinstance(m, Qwen2_5_VLRMSNorm) for m in norms.values())
    model.save_pretrained(tmp_path)
    stock = type(model).from_pretrained(tmp_path)
    assert rms_norm_fusion.fused_rms_norms(stock) == {}
    assert set(stock.state_dict()) == set(model.state_dict())


def test_a_norm_that_computes_otherwise_is_refused_when_the_model_is_built(monkeypatch):
    """As if a transformers release had changed Qwen2.5-VL's norm to Gemma's (1 + weight)."""
    from family_models import build
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

    def gemma_like(self, hidden_states):
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (h * (1.0 + self.weight.float())).to(hidden_states.dtype)

    monkeypatch.setattr(Qwen2_5_VLRMSNorm, "forward", gemma_like)
    with pytest.raises(ValueError, match=r"Qwen2_5_VLRMSNorm.forward.*Refusing"):
        build("qwen2_5_vl")


@pytest.mark.parametrize("threads", [2, 3])
def test_the_weight_gradient_sums_every_threads_rows(threads):
    """The weight's gradient is summed over one partial per chunk of rows, a chunk per thread."""
    x, weight, grad = _inputs((1, 45, 300), torch.bfloat16, seed=9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, dx_one, dw_one = _grads(crystal_ext.ops.rms_norm, x, weight, grad)
        torch.set_num_threads(threads)
        _, dx_many, dw_many = _grads(crystal_ext.ops.rms_norm, x, weight, grad)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(dx_many, dx_one)
    # Another summation order of the same fp32 partials: one bf16 rounding at most.
    scale = dw_one.float().abs().max().item()
    assert torch.allclose(dw_many.float(), dw_one.float(), rtol=2**-7, atol=1e-3 * scale)


def test_outside_the_build_transformers_names_the_stock_classes():
    from family_models import build

    build("qwen2_5_vl")
    for stock in _stock_classes():
        module = importlib.import_module(rms_norm_fusion.FUSABLE_RMS_NORMS[stock.__name__])
        assert getattr(module, stock.__name__) is stock
    stocks = _stock_classes()

    def all_fused():
        return all(
            getattr(importlib.import_module(rms_norm_fusion.FUSABLE_RMS_NORMS[c.__name__]), c.__name__)
            is rms_norm_fusion.fused_class(c)
            for c in stocks
        )

    with rms_norm_fusion.fused_rms_norm_classes():
        with rms_norm_fusion.fused_rms_norm_classes():  # a nested one changes nothing
            assert all_fused()
        assert all_fused()
    assert _stock_classes() == stocks


def test_without_the_extension_models_keep_the_stock_norms(monkeypatch):
    """The baseline trains without the compiled extension (--lm_head_losses reference
    --no_crystal): its model must not hold norms that need the extension."""
    from family_models import build

    import crystal_ext.ops._extension as extension

    monkeypatch.setattr(extension, "extension_available", lambda: False)
    model, _, _ = build("qwen2_5_vl")
    assert rms_norm_fusion.fused_rms_norms(model) == {}
