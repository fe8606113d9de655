import sys
from pathlib import Path

import pytest
import torch

# Shared test helpers (tests/alignment_cases.py) are imported by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def cuda():
    """For tests of the CUDA kernels: skips where no GPU is visible, fails where a GPU is
    visible but the extension was built without its CUDA kernels (a CPU-only build must not
    pass the GPU tests by skipping them)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible")
    import crystal_ext

    assert crystal_ext.extension_available(), "a GPU is visible but the compiled extension is missing"
    assert crystal_ext.build_info()["cuda_kernels"], (
        "a GPU is visible but the extension was built without its CUDA kernels "
        "(rebuild without CRYSTAL_EXT_CPU_ONLY)"
    )
    return torch.device("cuda")
