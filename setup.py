"""Build entskip and its native library entskip._C.

The CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always built. The CUDA sources
(csrc/cuda/*.cu and their *.cpp glue) are built when the installed torch has CUDA,
unless ENTSKIP_NO_CUDA=1. The CPU kernels are compiled for the building machine's
instruction set (-march=native: a source build runs where it is built);
ENTSKIP_CPU_ARCH=x86-64-v3 (or any -march value) targets another, ENTSKIP_CPU_ARCH=
(empty) the compiler's default. They are compiled with OpenMP when torch's ATen uses it
(at::parallel_for is a header template: without -fopenmp it runs on one thread).
Install with

    pip install --no-build-isolation -e .
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _cublaslt():
    """``(include_dirs, library_dirs, extra_link_args)`` for cuBLASLt (the dense CUDA path).

    From the CUDA toolkit when it ships cuBLAS, else from the ``nvidia-cublas`` wheel that
    CUDA builds of torch install (``nvidia/cu13`` or ``nvidia/cublas``), which has only the
    versioned ``libcublasLt.so.N``: linked by file name, with an rpath to its folder.
    """
    home = cpp_extension.CUDA_HOME
    if os.path.exists(os.path.join(home, "include", "cublasLt.h")):
        return [], [], ["-lcublasLt"]
    try:
        import nvidia

        roots = [os.path.join(p, sub) for p in nvidia.__path__ for sub in ("cu13", "cublas")]
    except ImportError:
        roots = []
    for root in roots:
        libs = sorted(glob.glob(os.path.join(root, "lib", "libcublasLt.so*")))
        if os.path.exists(os.path.join(root, "include", "cublasLt.h")) and libs:
            lib_dir = os.path.join(root, "lib")
            return [os.path.join(root, "include")], [lib_dir], [f"-l:{os.path.basename(libs[0])}", f"-Wl,-rpath,{lib_dir}"]
    raise RuntimeError("entskip's CUDA build needs cuBLASLt (cublasLt.h and libcublasLt): none in CUDA_HOME "
                       f"({home}) or the nvidia-cublas wheel; set ENTSKIP_NO_CUDA=1 for a CPU-only build")


def _extension():
    sources = _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp")
    arch = os.environ.get("ENTSKIP_CPU_ARCH", "native")
    cxx = ["-O3"] + ([f"-march={arch}"] if arch else [])
    # torch's libgomp is already loaded when entskip._C is, so -fopenmp shares its thread pool.
    # Linux only: Apple clang has no -fopenmp, and MSVC spells it /openmp.
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []
    cxx += openmp
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    use_cuda = (
        cpp_extension.CUDA_HOME is not None
        and torch.version.cuda is not None
        and os.environ.get("ENTSKIP_NO_CUDA", "0") != "1"
        and bool(cuda_sources)
    )
    if use_cuda:
        # sm_80 and sm_90 (no sm_90a build: the kernels use mma.sync/ldmatrix/cp.async, no wgmma/TMA).
        nvcc = ["-O3", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        include_dirs, library_dirs, link_args = _cublaslt()
        return cpp_extension.CUDAExtension(
            "entskip._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            define_macros=[("ENTSKIP_WITH_CUDA", "1")],
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            extra_link_args=link_args + openmp,
        )
    return cpp_extension.CppExtension("entskip._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)


# Project metadata, packages and version live in pyproject.toml; this file only builds entskip._C.
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
