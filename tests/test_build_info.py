"""build_info(), `python -m crystal_ext.info`, and the behaviour without a usable extension."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crystal_ext

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_build_info_keys_and_values():
    info = crystal_ext.build_info()
    for key in (
        "torch_built_against",
        "torch_running",
        "cuda_built_against",
        "cpu_kernels",
        "cuda_kernels",
        "cuda_arch_list",
        "cpu_bf16_gemm",
        "gpu_visible",
        "extension_loaded",
    ):
        assert key in info
    assert info["torch_running"] == torch.__version__
    assert info["gpu_visible"] == torch.cuda.is_available()
    if crystal_ext.extension_available():
        assert info["cpu_kernels"] is True
        assert info["torch_built_against"] == torch.__version__
        if info["cuda_kernels"]:
            assert info["cuda_arch_list"], "CUDA kernels without target architectures"


def test_info_module_prints_json():
    out = subprocess.run(
        [sys.executable, "-m", "crystal_ext.info"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["torch_running"] == torch.__version__


def test_missing_extension_keeps_references_and_explains():
    code = (
        "import sys, warnings\n"
        "sys.modules['crystal_ext._C'] = None  # simulate a missing build\n"
        "warnings.simplefilter('always')\n"
        "import torch, crystal_ext\n"
        "assert not crystal_ext.extension_available()\n"
        "print('ERROR:', crystal_ext.extension_error())\n"
        "from crystal_ext.ops.layout import *\n"
        "q = torch.randn(1, 2, 12, 4); k = torch.randn(1, 1, 12, 4)\n"
        "layout = torch.tensor([[[0, 1], [1, 3], [3, 5], [5, 6], [6, 8], [8, 10]]])\n"
        "print('REF', float(crystal_ext.ops.reference.attention_alignment_loss(q, k, layout)))\n"
        "try:\n"
        "    crystal_ext.attention_alignment_loss(q, k, layout)\n"
        "except RuntimeError as e:\n"
        "    print('FUSED', e)\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "REF " in out.stdout
    assert "FUSED crystal_ext.attention_alignment_loss: fused kernels unavailable" in out.stdout
    assert "pip install --no-build-isolation -e" in out.stdout


@pytest.mark.skipif(not crystal_ext.extension_available(), reason="needs the extension")
def test_torch_version_mismatch_is_reported_with_the_fix():
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "import torch\n"
        "torch.__version__ = '0.0.0-other'\n"
        "import crystal_ext\n"
        "crystal_ext.extension_available()\n"
    )
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    assert "was built against torch" in out.stderr
    assert "but torch 0.0.0-other is running" in out.stderr
    assert "pip install --no-build-isolation -e" in out.stderr


@pytest.mark.skipif(not crystal_ext.extension_available(), reason="compiled extension unavailable")
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPU cores")
def test_cpu_kernels_run_on_several_threads():
    """at::parallel_for is compiled into the extension: without -fopenmp it silently runs on
    one thread (the CPU kernels did, until setup.py passed the flag)."""
    from crystal_ext.ops._extension import _C

    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        assert crystal_ext.build_info()["cpu_openmp"] is True
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _C.parallel_for_threads(64) == 2
    finally:
        torch.set_num_threads(threads)
