"""pytest fixtures of the benchmarks (the helpers themselves live in bench_utils.py), and a
terminal summary that prints what each benchmark recorded in `benchmark.extra_info`: the
reference's time, the ratios and the peak memory, which pytest-benchmark's own table (time
only) does not show."""

import gc

import pytest
from bench_utils import peak_memory_bytes


@pytest.fixture(autouse=True, scope="module")
def _release_cached_models(request):
    """Each benchmark file keeps its models in functools caches for its own tests; they are
    released when the file is done, so that one run of every file fits in 24 GB (a model with
    the 7B vocabulary holds 2-4 GB of embedding and head, and a full run once died of it)."""
    yield
    for value in list(vars(request.module).values()):
        own = getattr(value, "__module__", None) == request.module.__name__
        if own and callable(getattr(value, "cache_clear", None)):
            value.cache_clear()
    gc.collect()


@pytest.fixture
def measure_peak_memory():
    """measure_peak_memory(fn, device="cpu") -> peak bytes above the start while fn() runs."""
    return peak_memory_bytes


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if getattr(b, "extra_info", None)]
    if not benchmarks:
        return
    terminalreporter.section("crystal_ext: reference times, ratios and peak memory (extra_info)")
    for bench in benchmarks:
        terminalreporter.write_line(bench.fullname.split("::")[-1])
        for key, value in bench.extra_info.items():
            terminalreporter.write_line(f"    {key}: {_format(value)}")
