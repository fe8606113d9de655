"""The LM-head op's per-row passes on AVX-512 (csrc/cpu/vocab_rows) and its P W product through
MKL (csrc/cpu/gemm_bf16, where the CPU has AMX): the vector exp against float64, and the op on
bf16 inputs with each of them on and off (CRYSTAL_EXT_CPU_SIMD_ROWS, CRYSTAL_EXT_CPU_MKL_GEMM)
against the reference, -inf columns and NaN rows included. Skipped where the CPU has no
AVX512-BF16 (the op then never takes these paths)."""

from __future__ import annotations

import pytest
import torch
from test_lm_head_losses import NEG_INF_COLUMNS, SHAPES, make_problem, run

import crystal_ext
from crystal_ext.ops import reference
from crystal_ext.ops._extension import _C

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available() or not crystal_ext.build_info()["cpu_bf16_gemm"],
    reason="no compiled extension or no AVX512-BF16 on this CPU",
)

# What each variant turns off: the vector row passes, the MKL product, both (the scalar loops
# and our packed GEMM: the paths before either existed).
VARIANTS = {
    "default": {},
    "scalar_rows": {"CRYSTAL_EXT_CPU_SIMD_ROWS": "0"},
    "packed_pw": {"CRYSTAL_EXT_CPU_MKL_GEMM": "0"},
    "neither": {"CRYSTAL_EXT_CPU_SIMD_ROWS": "0", "CRYSTAL_EXT_CPU_MKL_GEMM": "0"},
}


def _set(monkeypatch, variant):
    for name in ("CRYSTAL_EXT_CPU_SIMD_ROWS", "CRYSTAL_EXT_CPU_MKL_GEMM"):
        monkeypatch.setenv(name, VARIANTS[variant].get(name, "1"))


def test_exp_within_two_ulp_of_float64():
    x = torch.cat([torch.linspace(-87.0, 88.0, 400_001), -torch.rand(10_000) * 1e-6])
    got = _C.cpu_rows_exp(x).double()
    gold = torch.exp(x.double())
    rel = ((got - gold).abs() / gold).max().item()
    assert rel <= 2.5 * 2.0**-24, rel / 2.0**-24


def test_exp_edges():
    x = torch.tensor([float("-inf"), -1e4, -104.5, -100.0, 0.0, -0.0, 89.0, float("inf"), float("nan")])
    got = _C.cpu_rows_exp(x)
    assert got[:3].eq(0).all()  # exactly 0: a -inf logit must give p = 0 (not NaN, not tiny)
    assert 0 < got[3] < 1e-43  # a denormal, as expf
    assert got[4] == 1 and got[5] == 1
    assert got[6] == float("inf") and got[7] == float("inf") and got[8].isnan()
    # lengths around the 16 lanes: the masked tail reads and writes only the tensor
    for n in (1, 15, 16, 17, 33):
        x = torch.linspace(-5, 1, n)
        torch.testing.assert_close(_C.cpu_rows_exp(x), torch.exp(x), rtol=3e-7, atol=0)


# The op's shapes, and one with more logit rows than the few-rows product takes (64) over two
# vocabulary blocks: P W through MKL, accumulating across blocks.
OP_SHAPES = SHAPES + [(100, 12, 9001, [20, 9], True, 0.2)]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", OP_SHAPES, ids=lambda s: f"N{s[0]}-Hd{s[1]}-V{s[2]}-M{sum(s[3])}")
def test_bf16_op_matches_reference(shape, variant, monkeypatch):
    """Every variant gives the losses of the scalar, packed path to fp32 rounding and d hidden
    as close to a float64 run as that path's (P enters the expectation GEMM in bf16, so a 1-ulp
    change of an exp may move one entry by a bf16 ulp: the variants differ at that scale)."""
    n, hd, vocab, pairs, bias, ignore = shape
    prob = make_problem(
        n, hd, vocab, pairs, bias=bias, ignore_fraction=ignore, seed=n + 2 * hd, weight_grad=False
    )
    gold = run(reference.lm_head_losses, prob, 0.5, dtype=torch.float64)
    _set(monkeypatch, "neither")
    before = run(crystal_ext.lm_head_losses, prob, 0.5, dtype=torch.bfloat16)
    _set(monkeypatch, variant)
    got = run(crystal_ext.lm_head_losses, prob, 0.5, dtype=torch.bfloat16)
    for name, g, b in zip(["ce", "kl"], got, before):
        torch.testing.assert_close(g, b, rtol=1e-5, atol=1e-6, msg=name)
    err = lambda a: (a.double() - gold[2]).norm().item()  # noqa: E731
    assert err(got[2]) <= 1.1 * err(before[2]) + 1e-6 * gold[2].abs().max().item(), (
        err(got[2]),
        err(before[2]),
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("columns", NEG_INF_COLUMNS.values(), ids=NEG_INF_COLUMNS.keys())
def test_bf16_op_with_neg_inf_columns(columns, variant, monkeypatch):
    """-inf bias over a whole block, the last block or one column, on the bf16 path: finite
    losses and gradients equal to the fp32-input run's (a -inf entry must give p = 0 in the
    row sums and no 0 * (-inf - -inf) in the pairs' cross terms)."""
    prob = make_problem(16, 8, 10000, [5, 4], bias=True, ignore_fraction=0.2, seed=17, weight_grad=False)
    prob["bias"][columns] = float("-inf")
    inside = (prob["targets"] >= columns.start) & (prob["targets"] < columns.stop)
    prob["targets"][inside] = columns.stop % 10000
    prob["hidden"], prob["weight"] = prob["hidden"].bfloat16().float(), prob["weight"].bfloat16().float()
    gold = run(reference.lm_head_losses, prob, 0.5, dtype=torch.float64)
    _set(monkeypatch, variant)
    got = run(crystal_ext.lm_head_losses, prob, 0.5, dtype=torch.bfloat16)
    for name, g, r in zip(["ce", "kl", "d hidden"], got, gold):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), r, rtol=2e-3, atol=2e-3 * r.abs().max().item(), msg=name)
    assert got[1] > 0


@pytest.mark.parametrize("variant", ["default", "neither"])
def test_bf16_op_nan_row_gives_nan(variant, monkeypatch):
    prob = make_problem(12, 6, 301, [4], bias=True, ignore_fraction=0.0, seed=4, weight_grad=False)
    prob["hidden"][prob["teacher_rows"][0]] = float("nan")
    _set(monkeypatch, variant)
    ce, kl = run(crystal_ext.lm_head_losses, prob, 1.0, dtype=torch.bfloat16)[:2]
    assert ce.isnan() and kl.isnan()
