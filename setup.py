"""Build the crystal_ext C++/CUDA extension (crystal_ext._C).

CPU kernels are always compiled. CUDA kernels are compiled when the installed torch is a
CUDA build and a CUDA toolkit (nvcc) can be found, also on machines without a GPU.

Environment knobs:
  CRYSTAL_EXT_CPU_ONLY=1     skip the CUDA kernels even when they could be built
  CRYSTAL_EXT_FORCE_CUDA=1   fail the build if the CUDA kernels cannot be built
  TORCH_CUDA_ARCH_LIST       target architectures (default "8.0;9.0;10.0;12.0+PTX": the PTX of the
                             newest one runs on GPUs newer than the list)
  MAX_JOBS                   parallel compile jobs (torch's own knob)
"""

import glob
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0;12.0+PTX"


def _toolkit_behind_nvcc(nvcc_path):
    """Follow symlinks and thin wrapper scripts (`exec /real/bin/nvcc "$@"`) to the toolkit."""
    real = Path(os.path.realpath(nvcc_path))
    try:
        text = real.read_text(errors="ignore") if real.stat().st_size < 64_000 else ""
    except OSError:
        text = ""
    match = re.search(r"(/\S+)/bin/nvcc\b", text)
    if match and Path(match.group(1), "bin", "nvcc").exists():
        return Path(match.group(1))
    if (real.parent.parent / "include" / "cuda_runtime.h").exists():
        return real.parent.parent
    return None


def find_cuda_home():
    """Locate the real CUDA toolkit. Must run before torch.utils.cpp_extension is imported:
    torch guesses CUDA_HOME once, at import, from the folder of the nvcc on the PATH, which is
    wrong when that nvcc is a wrapper script (the link then fails with `cannot find -lcudart`)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and Path(os.environ[var], "bin", "nvcc").exists():
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_behind_nvcc(nvcc)
        if home:
            return home
    candidates = sorted(glob.glob("/usr/local/cuda*"), reverse=True) + ["/opt/cuda"]
    for cand in candidates:
        if Path(cand, "bin", "nvcc").exists() and Path(cand, "include", "cuda_runtime.h").exists():
            return Path(cand)
    return None


def nvidia_wheel_include_dirs():
    """Header folders of the pip CUDA wheels (nvidia/cu13/include, ...), which carry headers
    (cuBLAS, cuSPARSE) that a minimal toolkit lacks."""
    dirs = []
    for entry in sys.path:
        for inc in glob.glob(os.path.join(entry, "nvidia", "*", "include")):
            if os.path.isdir(inc) and inc not in dirs:
                dirs.append(inc)
    return dirs


cuda_home = None
if os.environ.get("CRYSTAL_EXT_CPU_ONLY", "0") != "1":
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = str(cuda_home)

import torch  # noqa: E402  (after CUDA_HOME is fixed)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = cuda_home is not None and torch.version.cuda is not None
if os.environ.get("CRYSTAL_EXT_FORCE_CUDA", "0") == "1" and not with_cuda:
    sys.exit(
        "CRYSTAL_EXT_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
        f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit={cuda_home}"
    )

if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    # Without a visible GPU torch cannot pick the architectures itself.
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS

# torch adds the C++ standard it needs (C++20 from torch 2.10 on).
cxx_flags = ["-O3"]
link_flags = []
# at::parallel_for is a header template: with torch's OpenMP backend its `#pragma omp parallel`
# is compiled into OUR objects, and without -fopenmp it silently runs on one thread (measured:
# the CPU kernels used one of two cores). The extension then shares torch's libgomp.so.1.
if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
defines = [("CRYSTAL_TORCH_VERSION", f'"{torch.__version__}"')]
sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
include_dirs = [str(ROOT / "csrc")]

if with_cuda:
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    # The toolkit's own headers before the wheels': a torch built for a newer CUDA brings a newer
    # cuda_runtime.h in its wheels, and CCCL stops the compile when nvcc and the runtime headers
    # disagree ("CUDA compiler and CUDA toolkit headers are incompatible"). The wheels then only
    # supply what the toolkit lacks (cuBLAS, cuSPARSE).
    include_dirs += [str(cuda_home / "include")] + nvidia_wheel_include_dirs()
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    defines += [("CRYSTAL_WITH_CUDA", "1"), ("CRYSTAL_CUDA_ARCH_LIST", f'"{arch_list}"')]
    # Only the C++ compiler sees the string macros (build_info lives in bindings.cpp).
    nvcc_flags = ["-O3", "-lineinfo", "-DCRYSTAL_WITH_CUDA=1"]
    ext = CUDAExtension(
        "crystal_ext._C",
        sources,
        include_dirs=include_dirs,
        define_macros=defines,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension(
        "crystal_ext._C",
        sources,
        include_dirs=include_dirs,
        define_macros=defines,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
