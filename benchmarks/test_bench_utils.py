"""The timing helper's own bookkeeping (runs in the benchmarks' smoke pass; nothing here is timed)."""

import mmap

from bench_utils import alternate

MB64 = 64 * 2**20


def touch_fresh_pages():
    """Maps 64 MB anonymously and writes one byte per 4-KB page: 16,384 page faults, whatever
    malloc's policy."""
    with mmap.mmap(-1, MB64) as m:
        for offset in range(0, MB64, 4096):
            m[offset] = 1


def test_alternate_records_each_sides_page_faults():
    times = alternate(touch_fresh_pages, lambda: None, rounds=3)
    info = times.info()
    assert len(times.ours.seconds) == len(times.ours.page_faults) == 3, "warm-up calls recorded"
    assert info["ours_page_faults"] >= 8000, info
    assert info["published_page_faults"] < 1000, info
    assert info["ours_system_s"] >= 0 and info["published_system_s"] >= 0, info
