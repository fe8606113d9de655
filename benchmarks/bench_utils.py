"""Benchmark helpers: ours and the reference timed alternately in one process, peak-memory
measurement on CPU and CUDA, and the fused-op guard.

Peak memory of a call is the highest amount of tensor memory allocated by the call and alive
at once: on CUDA from torch.cuda.max_memory_allocated above the starting point, on the CPU
from the allocation events of the torch profiler (profile_memory=True), replayed in order
(frees of memory allocated before the call do not lower it).
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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


def benchmark_threads() -> int:
    """The torch thread count every timed benchmark runs with, set explicitly so that a ratio
    never compares runs with different thread counts: CRYSTAL_BENCH_THREADS, or all cores."""
    threads = int(os.environ.get("CRYSTAL_BENCH_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


@dataclass
class Side:
    """One of the two things compared: `run` is timed; `enter` (untimed) puts the shared model
    in this side's set-up before its calls, when the two sides need different ones."""

    run: Callable[[], object]
    enter: Callable[[], None] | None = None
    seconds: list[float] = field(default_factory=list)
    # Per timed call: the page faults the process took and the CPU seconds spent in the kernel.
    # A call that allocates gigabytes of fresh tensors (the published recipe's fp32 logits) pays
    # for every 4 KB page in the kernel, at a price that differs from host to host.
    page_faults: list[int] = field(default_factory=list)
    system_seconds: list[float] = field(default_factory=list)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass
class Alternated:
    """Times of ours and theirs from `alternate`; ratio = theirs / ours (above 1: ours faster)."""

    ours: Side
    theirs: Side
    threads: int
    load: tuple[float, float]  # 1-minute load average before and after

    @property
    def ratio_median(self) -> float:
        return self.theirs.median / self.ours.median

    @property
    def ratio_min(self) -> float:
        return self.theirs.min / self.ours.min

    def info(self, ours_name: str = "ours", theirs_name: str = "published") -> dict:
        r = lambda x: round(x, 3)  # noqa: E731
        return {
            f"{ours_name}_s_median": r(self.ours.median),
            f"{ours_name}_s_min": r(self.ours.min),
            f"{theirs_name}_s_median": r(self.theirs.median),
            f"{theirs_name}_s_min": r(self.theirs.min),
            "ratio_median": round(self.ratio_median, 2),
            "ratio_min": round(self.ratio_min, 2),
            f"{ours_name}_page_faults": round(statistics.median(self.ours.page_faults)),
            f"{theirs_name}_page_faults": round(statistics.median(self.theirs.page_faults)),
            f"{ours_name}_system_s": r(statistics.median(self.ours.system_seconds)),
            f"{theirs_name}_system_s": r(statistics.median(self.theirs.system_seconds)),
            "rounds": len(self.ours.seconds),
            "threads": self.threads,
            "load_average": f"{self.load[0]:.1f} -> {self.load[1]:.1f}",
        }


def _timed_call(side: Side, record: bool = True) -> None:
    if side.enter is not None:
        side.enter()
    # The other side's garbage (reference cycles holding large tensors) is freed here, not
    # inside the timed call.
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    side.run()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    if record:
        side.seconds.append(seconds)
        side.page_faults.append(after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt)
        side.system_seconds.append(after.ru_stime - before.ru_stime)


def alternate(ours, theirs, rounds: int = 3, warmup: int = 1) -> Alternated:
    """Time `ours` and `theirs` (callables or Sides) alternately in this process.

    Both first run `warmup` untimed calls each, so that first-call costs (oneDNN / MKL kernel
    selection, lazy initialisation, the allocator's first growth, optimizer states allocated at
    the first step) land in neither side's times. Then `rounds` rounds, each timing one call of
    both, in the order ours-theirs, theirs-ours, ... so that a load that drifts over the run
    (the machine is shared) falls on both alike, and each call follows the other side's call
    as often as its own. Threads are fixed (benchmark_threads) for both. Report min and median
    of each: the min is the least disturbed call, the median the typical one; their gap is the
    noise of this run. Beside the times, each side's page faults and kernel CPU seconds per call
    (medians): glibc maps every block above its mmap threshold (at most 32 MB) fresh and unmaps
    it on free, so a side that allocates large tensors anew in every call faults each of their
    pages in every call, and where that kernel time is large the ratio depends on this host's
    price of a fresh page.
    """
    ours = ours if isinstance(ours, Side) else Side(ours)
    theirs = theirs if isinstance(theirs, Side) else Side(theirs)
    threads = benchmark_threads()
    load_before = os.getloadavg()[0]
    for _ in range(warmup):
        for side in (ours, theirs):
            _timed_call(side, record=False)
    for i in range(rounds):
        for side in (ours, theirs) if i % 2 == 0 else (theirs, ours):
            _timed_call(side)
    return Alternated(ours, theirs, threads, (load_before, os.getloadavg()[0]))


def require_fused_ops() -> None:
    """Benchmarks never fall back to the reference: fail when the fused kernels are absent."""
    import crystal_ext

    if not crystal_ext.extension_available():
        pytest.fail(f"fused kernels unavailable: {crystal_ext.extension_error()}")
