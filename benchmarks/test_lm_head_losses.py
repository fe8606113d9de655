"""Benchmark: crystal_ext.lm_head_losses vs crystal_ext.ops.reference.lm_head_losses,
forward + backward, with peak memory.

Run: PYTHONPATH=. python -m pytest benchmarks/test_lm_head_losses.py --benchmark-only

Problem: N rows of hidden, Hd, vocabulary V; every row but the last is a CE row (the worst
case for the fused op: it cannot skip rows), 48 (teacher, student) pairs = 96 paired rows in
one sample, top-k fraction 0.1. The head is frozen (the project's LoRA setup: the LM-head
weight does not require grad), hidden requires grad; the "trained head" case (weight
requires grad) is measured too on the small shape.

Recorded in benchmark.extra_info, all measured in the same run:
  fused_s, reference_s, ratio_time = fused_s / reference_s (target <= 0.9);
  matmul_s = a plain torch.matmul [N, Hd] x [Hd, V] in the input dtype; the fused op does
    two GEMM passes of that size (logits, then P W) with a frozen head, so
    gemm_efficiency = 2 * matmul_s / fused_s is the fused op's GEMM throughput relative to
    the plain matmul, all of its non-GEMM work counted against it (target >= 0.7);
  cpu_bf16_gemm: whether bf16 ran on the AVX512-BF16 GEMM (crystal_ext.build_info());
  peak_fused_bytes, peak_reference_bytes: peak tensor memory above the start of one
    forward + backward, which produces hidden.grad (and weight.grad when it requires grad);
    ratio_peak (target <= 0.05); workspace_*_bytes = peak minus the gradients' bytes.
Timing thresholds live here, never in tests/.
"""

from __future__ import annotations

import pytest
import torch
from bench_utils import median_seconds, require_fused_ops

SHAPES = {
    "small": dict(n=97, hd=64, vocab=5003, n_pairs=12),
    "qwen0.5b": dict(n=708, hd=896, vocab=151936, n_pairs=48),
}
ROUNDS = {"small": 5, "qwen0.5b": 2}


def _problem(shape, dtype, weight_grad):
    cfg = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    n, hd, vocab, m = cfg["n"], cfg["hd"], cfg["vocab"], cfg["n_pairs"]
    hidden = torch.randn(n, hd, generator=g).to(dtype)
    weight = (torch.randn(vocab, hd, generator=g) * hd**-0.5).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[-1] = -100
    teacher = torch.arange(n - 2 * m - 1, n - m - 1)  # the answer E ...
    student = torch.arange(n - m - 1, n - 1)  # ... and its copy F
    sample = torch.zeros(m, dtype=torch.long)
    return hidden, weight.requires_grad_(weight_grad), targets, teacher, student, sample


def _step(fn, problem):
    hidden, weight, targets, teacher, student, sample = problem
    h = hidden.detach().requires_grad_()
    weight.grad = None
    ce, kl = fn(h, weight, targets, teacher, student, sample, 0.1)
    (ce + kl).backward()
    return h.grad, weight.grad


CASES = [
    ("small", torch.float32, False),
    ("small", torch.bfloat16, False),
    ("small", torch.float32, True),
    ("qwen0.5b", torch.float32, False),
    ("qwen0.5b", torch.bfloat16, False),
]


@pytest.mark.parametrize(
    "shape,dtype,weight_grad",
    CASES,
    ids=[f"{s}-{str(d).split('.')[-1]}-{'head-trained' if w else 'head-frozen'}" for s, d, w in CASES],
)
def test_lm_head_losses(benchmark, measure_peak_memory, shape, dtype, weight_grad):
    require_fused_ops()
    import crystal_ext
    from crystal_ext.ops import reference

    problem = _problem(shape, dtype, weight_grad)
    rounds = ROUNDS[shape]
    fused = lambda: _step(crystal_ext.lm_head_losses, problem)  # noqa: E731
    ref = lambda: _step(reference.lm_head_losses, problem)  # noqa: E731

    # Correctness guard before timing.
    with torch.no_grad():
        args = problem[:1] + (problem[1].detach(),) + problem[2:]
        f_ce, f_kl = crystal_ext.lm_head_losses(*args, 0.1)
        r_ce, r_kl = reference.lm_head_losses(*args, 0.1)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(f_ce, r_ce, rtol=tol, atol=tol, msg=lambda m: f"CE: {m}")
    torch.testing.assert_close(f_kl, r_kl, rtol=tol, atol=tol, msg=lambda m: f"KL: {m}")

    if benchmark.disabled:  # --benchmark-disable: one pass as a smoke test, no timings
        benchmark.pedantic(fused, rounds=1, iterations=1)
        return

    hidden, weight = problem[0], problem[1].detach()
    a, b = hidden.detach(), weight.t()
    matmul = lambda: torch.matmul(a, b)  # noqa: E731
    fused()
    ref()
    matmul()  # warm-up
    reference_s = median_seconds(ref, rounds)
    matmul_s = median_seconds(matmul, rounds)
    benchmark.pedantic(fused, rounds=rounds, iterations=1, warmup_rounds=0)
    fused_s = benchmark.stats.stats.median

    peak_fused = measure_peak_memory(fused)
    peak_ref = measure_peak_memory(ref)
    grad_bytes = hidden.numel() * hidden.element_size()
    if weight_grad:
        grad_bytes += weight.numel() * weight.element_size()
    bf16_gemm = bool(crystal_ext.build_info()["cpu_bf16_gemm"])
    info = benchmark.extra_info
    info.update(
        shape=shape,
        dtype=str(dtype),
        weight_requires_grad=weight_grad,
        n=SHAPES[shape]["n"],
        hd=SHAPES[shape]["hd"],
        vocab=SHAPES[shape]["vocab"],
        paired_rows=2 * SHAPES[shape]["n_pairs"],
        threads=torch.get_num_threads(),
        fused_s=fused_s,
        reference_s=reference_s,
        ratio_time=fused_s / reference_s,
        matmul_s=matmul_s,
        gemm_efficiency=2 * matmul_s / fused_s,
        peak_fused_bytes=peak_fused,
        peak_reference_bytes=peak_ref,
        ratio_peak=peak_fused / peak_ref,
        grad_bytes=grad_bytes,
        workspace_fused_bytes=peak_fused - grad_bytes,
        workspace_reference_bytes=peak_ref - grad_bytes,
        ce_fused=float(f_ce),
        ce_reference=float(r_ce),
        kl_fused=float(f_kl),
        kl_reference=float(r_kl),
        cpu_bf16_gemm=bf16_gemm,
    )
    print(
        f"\n[{shape} {dtype} weight_grad={weight_grad}] fused {fused_s:.3f}s reference "
        f"{reference_s:.3f}s ratio {fused_s / reference_s:.2f} | matmul {matmul_s:.3f}s "
        f"gemm_eff {2 * matmul_s / fused_s:.2f} | peak fused {peak_fused / 2**20:.1f} MiB "
        f"reference {peak_ref / 2**20:.1f} MiB ratio {peak_fused / peak_ref:.3f} | "
        f"cpu_bf16_gemm {bf16_gemm}"
    )
    # Targets checked only at the Qwen-like shape with a frozen head, where they
    # are defined; the small shape is reported for information.
    if shape == "qwen0.5b":
        assert peak_fused <= 0.05 * peak_ref, "peak memory target missed"
        # bf16 meets the time targets only with the AVX512-BF16 GEMM (fp32 output at bf16
        # speed); elsewhere the op converts bf16 blocks to fp32 and is reported, not asserted.
        if dtype == torch.float32 or bf16_gemm:
            assert fused_s <= 0.9 * reference_s, "time target missed"
            assert 2 * matmul_s / fused_s >= 0.7, "GEMM efficiency target missed"
