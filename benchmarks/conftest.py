"""pytest fixtures of the benchmarks (the helpers themselves live in bench_utils.py)."""

import pytest
from bench_utils import peak_memory_bytes


@pytest.fixture
def measure_peak_memory():
    """measure_peak_memory(fn, device="cpu") -> peak bytes above the start while fn() runs."""
    return peak_memory_bytes
