"""The LM-head op's one-pass kept pairs' sweep (csrc/cpu/gemm_bf16: sweep_logits_then_product):
per block of w's rows, S = a w^T, D from S by the caller, then D w, each block on one thread.
Against fp32 / fp64 products of the same bf16 values on every edge of its blocking: blocks of
64 rows of w (a short and an odd last block), tiles of 16 columns of S^T (m = 1 .. 128),
64-row calls for D (d_rows = 65 .. 128), column groups of 256 (k = 98, 258), and k over one
4096-pair pass (k = 8194). Skipped where the CPU has no AMX (the op then runs two GEMMs)."""

from __future__ import annotations

import pytest
import torch

import crystal_ext
from crystal_ext.ops._extension import _C

pytestmark = pytest.mark.skipif(
    not crystal_ext.extension_available() or not _C.cpu_gemm_sweep_available(1, 1, 2),
    reason="no compiled extension, or no AMX on this CPU: the op's sweep runs as two GEMMs",
)

# (m, d_rows, k, n)
SIZES = [
    (1, 1, 2, 1),
    (18, 9, 96, 209),
    (2, 1, 98, 64),
    (76, 38, 258, 130),
    (128, 128, 64, 65),
    (33, 0, 40, 100),
    (5, 3, 8194, 70),
    (17, 16, 32, 1000),
]


def _d_of(s: torch.Tensor, d_rows: int) -> torch.Tensor:
    """The entry point's D: bf16(S[r, v] * (1 + v % 3)) for the first d_rows rows."""
    factor = 1 + torch.arange(s.shape[1]) % 3
    return (s[:d_rows] * factor).bfloat16()


@pytest.mark.parametrize("m,d_rows,k,n", SIZES, ids=lambda v: str(v))
def test_matches_the_two_products_of_the_same_values(m, d_rows, k, n):
    g = torch.Generator().manual_seed(m * 31 + k + n)
    a = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    s, c = _C.cpu_gemm_sweep(a, w, d_rows)
    s_ref = a.double() @ w.double().t()  # products of bf16 values are exact; sums differ in order
    assert torch.allclose(s.double(), s_ref, rtol=1e-5, atol=1e-4 * k**0.5), (s.double() - s_ref).abs().max()
    # D from the S the blocks saw, so a value on a bf16 rounding boundary cannot flip.
    c_ref = _d_of(s, d_rows).double() @ w.double()
    assert c.shape == (d_rows, k)
    scale = c_ref.abs().max().item() if d_rows else 0.0
    assert torch.allclose(c.double(), c_ref, rtol=1e-5, atol=1e-5 * scale + 1e-6), (
        (c.double() - c_ref).abs().max()
    )


def test_threads_partial_products_add_up_the_same_every_time():
    """On two threads each takes its own blocks of w and its own partial D w; c is their sum,
    added in block order, not in the order the threads finish (the test suite may run with one
    thread: this test runs two)."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(20, 200, generator=g).bfloat16()
    w = torch.randn(3001, 200, generator=g).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s, first = _C.cpu_gemm_sweep(a, w, 10)
        again = [_C.cpu_gemm_sweep(a, w, 10)[1] for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    c_ref = _d_of(s, 10).double() @ w.double()
    assert torch.allclose(first.double(), c_ref, rtol=1e-5, atol=1e-5 * c_ref.abs().max().item())
    assert all(torch.equal(c, first) for c in again)


def test_refuses_what_it_cannot_run(monkeypatch):
    w = torch.zeros(10, 8).bfloat16()
    with pytest.raises(RuntimeError, match=r"m \(rows of a\) must be in \[1, 128\], got 129"):
        _C.cpu_gemm_sweep(torch.zeros(129, 8).bfloat16(), w, 1)
    with pytest.raises(RuntimeError, match=r"d_rows must be in \[0, m = 2\], got 3"):
        _C.cpu_gemm_sweep(torch.zeros(2, 8).bfloat16(), w, 3)
    with pytest.raises(RuntimeError, match=r"k \(columns of w\) must be even, got 7"):
        _C.cpu_gemm_sweep(torch.zeros(2, 7).bfloat16(), torch.zeros(10, 7).bfloat16(), 1)
    monkeypatch.setenv("CRYSTAL_EXT_CPU_ONE_PASS_SWEEP", "0")
    assert not _C.cpu_gemm_sweep_available(2, 1, 8)
    with pytest.raises(RuntimeError, match=r"CRYSTAL_EXT_CPU_ONE_PASS_SWEEP"):
        _C.cpu_gemm_sweep(torch.zeros(2, 8).bfloat16(), w, 1)
