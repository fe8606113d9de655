"""Benchmark helpers: peak-memory measurement on CPU and CUDA, and the fused-op guard.

Peak memory of a call is the highest amount of tensor memory allocated above what was
allocated when the call started: on CUDA from torch.cuda.max_memory_allocated, on the CPU
from the allocation events of the torch profiler (profile_memory=True), replayed in order.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's start/stop lines


def _cpu_peak_bytes(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        if e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        current += e.nbytes()
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


def require_fused_ops() -> None:
    """Benchmarks never fall back to the reference: fail when the fused kernels are absent."""
    import crystal_ext

    if not crystal_ext.extension_available():
        pytest.fail(f"fused kernels unavailable: {crystal_ext.extension_error()}")
