"""The CPU bf16 x bf16 -> fp32 GEMM (csrc/cpu/gemm_bf16) that the fused LM-head losses use
for bf16 inputs: exact against an fp32 GEMM of the same bf16 values (up to summation order)
on every edge of its blocking, on each of its paths (MKL's GEMM for products by w and AMX tiles
where the CPU has AMX, AMX tiles alone with CRYSTAL_EXT_CPU_MKL_GEMM=0, the AVX512-BF16 kernel
otherwise or with CRYSTAL_EXT_CPU_AMX=0; on a CPU without AMX every id runs the AVX512-BF16
kernel). Skipped where the CPU has no AVX512-BF16."""

from __future__ import annotations

import pytest
import torch

import crystal_ext
from crystal_ext.ops._extension import _C

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available() or not crystal_ext.build_info()["cpu_bf16_gemm"],
    reason="no compiled extension or no AVX512-BF16 on this CPU",
)

# (m, k, n): rows around the 14-row micro-kernel, the AMX path's 64-row blocks and the 96 rows
# up to which a product by w runs k-block outer instead of through MKL, row counts
# that are multiples of neither (779: the LM-head rows at |E| = 384), n around the 32-column
# panel, odd k (pad pair), k over one 4096-pair pass, a k whose row stride is a multiple of
# 2 KB (padded), and an A of over 3 MB (620 x 2600: more than L2 holds while panels stream past).
SIZES = [
    (63, 40, 33),
    (64, 601, 97),
    (96, 70, 40),
    (97, 70, 40),
    (65, 130, 64),
    (129, 7, 95),
    (779, 96, 70),
    (1, 1, 1),
    (13, 7, 31),
    (14, 8, 32),
    (15, 9, 33),
    (29, 896, 100),
    (3, 8193, 17),
    (30, 2048, 64),
    (2, 9000, 5),
    (620, 2600, 70),
]


@pytest.fixture(params=["mkl", "amx", "avx512bf16"])
def path(request, monkeypatch):
    """The GEMM path under test (read by the extension at each call): products by w through
    MKL and by w^T on AMX tiles ("mkl", the default where the CPU has AMX), both on AMX tiles,
    or both on the AVX512-BF16 kernel."""
    monkeypatch.setenv("CRYSTAL_EXT_CPU_AMX", "0" if request.param == "avx512bf16" else "1")
    monkeypatch.setenv("CRYSTAL_EXT_CPU_MKL_GEMM", "1" if request.param == "mkl" else "0")
    return request.param


@pytest.mark.parametrize("m,k,n", SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("transposed", [True, False], ids=["w^T", "w"])
def test_matches_fp32_gemm_of_the_same_values(m, k, n, transposed, path):
    g = torch.Generator().manual_seed(m * 7 + k + n)
    a = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16() if transposed else torch.randn(k, n, generator=g).bfloat16()
    b = w.double().t() if transposed else w.double()
    gold = a.double() @ b
    got = _C.cpu_gemm_bf16(a, w, transposed)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # fp32 accumulation of exact products: each of the k additions rounds by at most 2^-24 of
    # the partial sum, with random signs, so the error grows like sqrt(k) * 2^-24 * sum |a b|
    # (the probabilistic bound of Higham & Mary), not the worst case k * 2^-24 * sum |a b|. The
    # worst case would be ~10 on outputs of ~90 at k = 8193 and pass a GEMM that dropped a
    # whole k-pass; this bound is ~0.1 there.
    bound = 4 * k**0.5 * 2.0**-24 * (a.double().abs() @ b.abs()) + 1e-30
    assert ((got.double() - gold).abs() <= bound).all()


def test_empty_k_gives_zeros(path):
    got = _C.cpu_gemm_bf16(torch.empty(3, 0).bfloat16(), torch.empty(5, 0).bfloat16(), True)
    assert torch.equal(got, torch.zeros(3, 5))


# The few-rows AMX product by w^T (w as the tiles' A operand, m <= 64), the k-outer one by w
# (m <= 96), and MKL's / the packed AMX path's.
@pytest.mark.parametrize("m", [17, 90, 100])
@pytest.mark.parametrize("transposed", [True, False], ids=["w^T", "w"])
def test_accumulates_into_out(path, m, transposed):
    a, w, out, b = _accumulation_problem(m, 40, transposed)
    expected = out.double() + a.double() @ b
    got = _C.cpu_gemm_bf16(a, w, transposed, out)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-5)


# An A of over 3 MB (400 x 4100), more than L2 holds. The fixed tolerance above does not hold
# at k = 4100; the bound is the sqrt(k) one of test_matches_fp32_gemm_of_the_same_values.
@pytest.mark.parametrize("transposed", [True, False], ids=["w^T", "w"])
def test_accumulates_into_out_with_a_large_a(path, transposed):
    k = 4100
    a, w, out, b = _accumulation_problem(400, k, transposed)
    expected = out.double() + a.double() @ b
    got = _C.cpu_gemm_bf16(a, w, transposed, out)
    assert got.data_ptr() == out.data_ptr()
    size = a.double().abs() @ b.abs() + out.double().abs()
    assert ((got.double() - expected).abs() <= 4 * (k + 1) ** 0.5 * 2.0**-24 * size + 1e-6).all()


def _accumulation_problem(m, k, transposed):
    """(a [m, k], w, out [m, 45], B = w^T or w in float64) for the accumulation tests."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(m, k, generator=g).bfloat16()
    w = (
        torch.randn(45, k, generator=g).bfloat16()
        if transposed
        else torch.randn(k, 45, generator=g).bfloat16()
    )
    out = torch.randn(m, 45, generator=g)
    return a, w, out, (w.double().t() if transposed else w.double())


@pytest.mark.parametrize(
    "m,m2,k,n",
    [(61, 48, 3584 // 8, 300), (17, 17, 40, 45), (64, 1, 9000, 33), (90, 70, 64, 40), (205, 192, 40, 33)],
)
@pytest.mark.parametrize("accumulate", [False, True])
def test_second_a_adds_into_the_first_rows(path, m, m2, k, n, accumulate):
    # The LM-head op's lo parts of P: a2's product adds into c's first m2 rows, in one pass over w
    # on the k-outer path (m <= 96), as two GEMMs otherwise.
    g = torch.Generator().manual_seed(m + m2 + k)
    a = torch.randn(m, k, generator=g).bfloat16()
    a2 = torch.randn(m2, k, generator=g).bfloat16()
    w = torch.randn(k, n, generator=g).bfloat16()
    out = torch.randn(m, n, generator=g) if accumulate else None
    gold = a.double() @ w.double()
    gold[:m2] += a2.double() @ w.double()
    if accumulate:
        gold += out.double()
    got = _C.cpu_gemm_bf16(a, w, False, out, a2)
    size = a.double().abs() @ w.double().abs()
    size[:m2] += a2.double().abs() @ w.double().abs()
    assert ((got.double() - gold).abs() <= 4 * (2 * k) ** 0.5 * 2.0**-24 * size + 1e-5 * accumulate).all()


def test_non_finite_values_propagate_and_pad_is_clean(path):
    # An odd k pads A and B with a zero column / row: that pad must not inject NaN, while a
    # real inf in the data must come through.
    a = torch.ones(3, 5).bfloat16()
    w = torch.ones(4, 5).bfloat16()
    w[2, 4] = float("inf")
    got = _C.cpu_gemm_bf16(a, w, True)
    assert torch.isinf(got[:, 2]).all()
    torch.testing.assert_close(got[:, [0, 1, 3]], torch.full((3, 3), 5.0))


def test_bad_operands_raise():
    with pytest.raises(RuntimeError, match="bf16"):
        _C.cpu_gemm_bf16(torch.randn(3, 4), torch.randn(5, 4).bfloat16(), True)
    with pytest.raises(RuntimeError, match="columns"):
        _C.cpu_gemm_bf16(torch.randn(3, 4).bfloat16(), torch.randn(5, 6).bfloat16(), True)


# Shapes at every edge of the vector packs: the transposed pack moves 16 x 16 tiles of 32-bit
# words (k-pairs in runs of 16 with a masked last run, rows of w in halves of a 32-column
# panel, zeros past the last row, an odd k's last pair), the straight pack 32 columns of a
# pair of rows (masked past column n, a missing second row at odd k, pairs split in runs of 8);
# the packs deferred into the AMX GEMM go in groups of 4 panels (5 panels: a short last group),
# per k pass (k = 8193: two passes and an odd k), over row blocks of 64 (m = 65).
PACK_SIZES = [
    (5, 1, 1),
    (5, 2, 16),
    (5, 30, 15),
    (5, 32, 17),
    (5, 33, 31),
    (5, 34, 32),
    (5, 62, 33),
    (5, 64, 47),
    (5, 67, 63),
    (5, 15, 64),
    (5, 17, 65),
    (5, 33, 1),
    (65, 130, 160),
    (3, 8193, 161),
]
# How B is packed: deferred into the GEMM (the default where the CPU has AMX and AVX512BW),
# eagerly with the vector packs, eagerly with the scalar loops (the reference for the bits).
PACK_MODES = {
    "deferred": {},
    "eager_vector": {"CRYSTAL_EXT_CPU_PACK_IN_GEMM": "0"},
    "scalar": {"CRYSTAL_EXT_CPU_SIMD_PACK": "0"},
}


@pytest.mark.parametrize("m,k,n", PACK_SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("transposed", [True, False], ids=["w^T", "w"])
def test_every_pack_gives_the_same_bits(m, k, n, transposed, path, monkeypatch):
    # The packs only move values, so the GEMM must give the same bits whichever pack ran, and
    # the fp32 GEMM's values.
    g = torch.Generator().manual_seed(m * 7 + k * 3 + n)
    a = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16() if transposed else torch.randn(k, n, generator=g).bfloat16()
    got = {}
    for mode, env in PACK_MODES.items():
        for name in ("CRYSTAL_EXT_CPU_PACK_IN_GEMM", "CRYSTAL_EXT_CPU_SIMD_PACK"):
            monkeypatch.setenv(name, env.get(name, "1"))
        got[mode] = _C.cpu_gemm_bf16(a, w, transposed)
    # On the MKL path a product by w runs through MKL except in the deferred mode with at most
    # 96 rows (our k-outer AMX path): two summations, so values are compared there, not bits.
    mkl_products = path == "mkl" and not transposed
    for mode in PACK_MODES:
        if not mkl_products:
            assert torch.equal(got[mode], got["scalar"]), mode
    b = w.double().t() if transposed else w.double()
    gold = a.double() @ b
    bound = 4 * k**0.5 * 2.0**-24 * (a.double().abs() @ b.abs()) + 1e-30
    for mode in PACK_MODES:
        assert ((got[mode].double() - gold).abs() <= bound).all(), mode
