"""The timing helper's own bookkeeping (runs in the benchmarks' smoke pass, no timing asserted)."""

import torch
from bench_utils import alternate


def test_alternate_records_each_sides_page_faults():
    # 64 MB is above glibc's largest mmap threshold (32 MB), so every call maps fresh pages and
    # faults each of its 16,384 4-KB pages in; the other side allocates nothing.
    fresh = lambda: torch.ones(16 * 2**20).sum()  # noqa: E731
    times = alternate(fresh, lambda: None, rounds=3)
    info = times.info()
    assert len(times.ours.seconds) == len(times.ours.page_faults) == 3, "warm-up calls recorded"
    assert info["ours_page_faults"] >= 8000, info
    assert info["published_page_faults"] < 1000, info
    assert info["ours_system_s"] >= 0 and info["published_system_s"] >= 0, info
