"""Loading of the compiled extension (crystal_ext._C) and the facts about how it was built.

The fused ops need the extension; the plain-PyTorch references in crystal_ext.ops.reference do
not. When the extension is missing or was built against another torch, loading it (the first
use of a fused op, or of extension_available / build_info) still works and says why (with the
command that fixes it); calling a fused op then raises instead of silently falling back to the
reference.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import torch

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
if (_PROJECT_ROOT / "setup.py").exists():
    REBUILD_COMMAND = f"pip install --no-build-isolation -e {_PROJECT_ROOT}"
else:
    REBUILD_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps crystal_ext"

_C = None
_load_error: str | None = None
try:
    _C = importlib.import_module("crystal_ext._C")
except ImportError as exc:  # missing .so, or an ABI mismatch with the running torch
    _load_error = (
        f"the compiled extension crystal_ext._C could not be imported ({exc}). "
        f"Build it against the installed torch {torch.__version__} with: {REBUILD_COMMAND}"
    )
    warnings.warn(f"crystal_ext: fused ops unavailable: {_load_error}", RuntimeWarning, stacklevel=2)

_version_mismatch: str | None = None
if _C is not None:
    _built = _C.build_info()["torch_built_against"]
    if _built != torch.__version__:
        _version_mismatch = (
            f"crystal_ext._C was built against torch {_built} but torch {torch.__version__} is "
            f"running; rebuild it with: {REBUILD_COMMAND}"
        )
        warnings.warn(f"crystal_ext: {_version_mismatch}", RuntimeWarning, stacklevel=2)


def extension_available() -> bool:
    """True when the compiled kernels were imported."""
    return _C is not None


def extension_error() -> str | None:
    """Why the fused ops are unavailable (None when they are available)."""
    return _load_error


def build_info() -> dict:
    """How the extension was built and what this process can run.

    Keys: torch_built_against, torch_running, torch_matches, cuda_built_against,
    cuda_running (torch's CUDA version), cpu_kernels, cuda_kernels, cuda_arch_list,
    cpu_openmp (the CPU kernels' at::parallel_for runs on torch's OpenMP threads),
    cpu_bf16_gemm (bf16 CPU GEMMs with fp32 output run on AVX512-BF16 here; without it the
    CPU kernels convert bf16 operands to fp32 first), gpu_visible, gpu_name,
    extension_loaded, extension_error.
    """
    info = {
        "torch_built_against": None,
        "cuda_built_against": None,
        "cpu_kernels": False,
        "cuda_kernels": False,
        "cuda_arch_list": [],
        "cpu_openmp": False,
        "cpu_bf16_gemm": False,
    }
    if _C is not None:
        raw = dict(_C.build_info())
        info.update(raw)
        arch = raw.get("cuda_arch_list") or ""
        info["cuda_arch_list"] = [a for a in arch.replace(",", ";").split(";") if a]
    gpu = torch.cuda.is_available()
    info.update(
        torch_running=torch.__version__,
        torch_matches=info["torch_built_against"] == torch.__version__,
        cuda_running=torch.version.cuda,
        gpu_visible=gpu,
        gpu_name=torch.cuda.get_device_name(0) if gpu else None,
        extension_loaded=_C is not None,
        extension_error=_load_error,
    )
    return info


_plan_errors: dict[str, str] = {}


def plan_mismatch(op_name: str, fields: tuple[str, ...]) -> str | None:
    """Why the compiled kernels would misread `op_name`'s plan with these fields (the Python
    plan's NamedTuple fields, in order), or None when they unpack the same tensors in the same
    order (crystal_ext._C.plan_tensor_names(), from the one list in csrc/<plan header>)."""
    compiled = tuple(_C.plan_tensor_names().get(op_name, ()))
    if compiled == tuple(fields):
        return None
    return (
        f"the compiled kernels unpack the {op_name} plan as {list(compiled)} but the Python plan "
        f"holds {list(fields)}: rebuild the extension ({REBUILD_COMMAND}) or make the two lists "
        f"agree"
    )


def register_plan(op_name: str, fields: tuple[str, ...]) -> None:
    """Check, when an op module loads, that the kernels read its plan as Python builds it; on a
    mismatch warn and make every call of the op raise (require_fused) instead of misreading."""
    error = plan_mismatch(op_name, fields) if _C is not None else None
    if error is not None:
        _plan_errors[op_name] = error
        warnings.warn(f"crystal_ext.{op_name}: {error}", RuntimeWarning, stacklevel=2)


def require_fused(op_name: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error when `op_name` cannot run on these tensors' device."""
    if _C is None:
        raise RuntimeError(f"crystal_ext.{op_name}: fused kernels unavailable: {_load_error}")
    if op_name in _plan_errors:
        raise RuntimeError(f"crystal_ext.{op_name}: {_plan_errors[op_name]}")
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda and not _C.build_info()["cuda_kernels"]:
            raise RuntimeError(
                f"crystal_ext.{op_name}: got CUDA tensors but this build of crystal_ext has no "
                f"CUDA kernels (it was compiled without a CUDA toolkit or with a CPU-only torch). "
                f"Rebuild on a machine with nvcc and a CUDA build of torch: {REBUILD_COMMAND}"
            )
