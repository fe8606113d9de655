"""The rules of tests/conftest.py, run on small throwaway test files in a subprocess: a test that
leaks process-wide state fails, one that restores it passes; with a GPU visible (faked here) a CUDA
test fails when the kernels are missing, and a session whose CUDA tests all skipped fails."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parent / "conftest.py"


def _pytest(tmp_path, source: str) -> subprocess.CompletedProcess:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_case.py").write_text(source)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a GPU\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_leaked_state_fails_the_test_that_leaked_it(tmp_path):
    proc = _pytest(
        tmp_path,
        """
import os
import torch

def test_leaks_tf32():
    torch.backends.cuda.matmul.allow_tf32 = not torch.backends.cuda.matmul.allow_tf32

def test_leaks_environment():
    os.environ["CRYSTAL_EXT_LEAK_CHECK"] = "1"

def test_restores_what_it_changes(monkeypatch):
    # monkeypatch cannot undo torch.backends.cuda.matmul.allow_tf32 (not a plain attribute)
    was = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

def test_after_the_leaks_sees_the_original_state():
    assert "CRYSTAL_EXT_LEAK_CHECK" not in os.environ
""",
    )
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "ERROR test_case.py::test_leaks_tf32" in out and "allow_tf32" in out
    assert "ERROR test_case.py::test_leaks_environment" in out and "CRYSTAL_EXT_LEAK_CHECK" in out
    assert "4 passed, 2 errors" in out


FAKE_GPU = """
import pytest
import torch

import crystal_ext

info = dict(crystal_ext.build_info(), cuda_kernels=KERNELS)
torch.cuda.is_available = lambda: True  # a visible GPU, for the conftest's rules
crystal_ext.build_info = lambda: info

@pytest.mark.cuda
def test_on_the_gpu():
    pass
"""


def test_visible_gpu_without_kernels_fails_cuda_tests(tmp_path):
    proc = _pytest(tmp_path, FAKE_GPU.replace("KERNELS", "False"))
    assert proc.returncode == 1 and "built without its CUDA kernels" in proc.stdout, proc.stdout


def test_visible_gpu_with_every_cuda_test_skipped_fails_the_session(tmp_path):
    proc = _pytest(
        tmp_path,
        FAKE_GPU.replace("KERNELS", "True").replace(
            "@pytest.mark.cuda\n", "@pytest.mark.cuda\n@pytest.mark.skip(reason='wrong condition')\n"
        ),
    )
    assert proc.returncode == 1 and "all 1 CUDA tests skipped" in proc.stdout, proc.stdout
