"""Benchmark helpers: peak-memory measurement on CPU and CUDA, and the fused-op guard.

Peak memory of a call is the highest amount of tensor memory allocated by the call and alive
at once: on CUDA from torch.cuda.max_memory_allocated above the starting point, on the CPU
from the allocation events of the torch profiler (profile_memory=True), replayed in order
(frees of memory allocated before the call do not lower it).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's start/stop lines


def _cpu_peak_bytes(fn) -> int:
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    # The events carry sizes but no addresses, and a free of a block allocated before the
    # window (e.g. last step's .grad released by zero_grad) may appear: count a free only
    # when an allocation of that size made inside the window is still outstanding.
    outstanding: Counter = Counter()
    current = peak = 0
    for e in events:
        size = e.nbytes()
        if size > 0:
            outstanding[size] += 1
        elif size < 0:
            if outstanding[-size] == 0:
                continue
            outstanding[-size] -= 1
        current += size
        peak = max(peak, current)
    return peak


def _cuda_peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def peak_memory_bytes(fn, device: str | torch.device = "cpu") -> int:
    """Peak bytes allocated above the starting point while fn() runs (fn's outputs included,
    as long as fn keeps them alive until it returns)."""
    if torch.device(device).type == "cuda":
        return _cuda_peak_bytes(fn)
    return _cpu_peak_bytes(fn)


def median_seconds(fn, rounds: int) -> float:
    """Median wall time of `rounds` calls of fn()."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def require_fused_ops() -> None:
    """Benchmarks never fall back to the reference: fail when the fused kernels are absent."""
    import crystal_ext

    if not crystal_ext.extension_available():
        pytest.fail(f"fused kernels unavailable: {crystal_ext.extension_error()}")
