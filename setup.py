"""Build entskip and its native library entskip._C.

The CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always built. The CUDA sources
(csrc/cuda/*.cu and their *.cpp glue) are built when the installed torch has CUDA,
unless ENTSKIP_NO_CUDA=1. The CPU kernels are compiled for the building machine's
instruction set (-march=native: a source build runs where it is built);
ENTSKIP_CPU_ARCH=x86-64-v3 (or any -march value) targets another, ENTSKIP_CPU_ARCH=
(empty) the compiler's default. Install with

    pip install --no-build-isolation -e .
"""

import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension():
    sources = _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp")
    arch = os.environ.get("ENTSKIP_CPU_ARCH", "native")
    cxx = ["-O3"] + ([f"-march={arch}"] if arch else [])
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    use_cuda = (
        cpp_extension.CUDA_HOME is not None
        and __import__("torch").version.cuda is not None
        and os.environ.get("ENTSKIP_NO_CUDA", "0") != "1"
        and bool(cuda_sources)
    )
    if use_cuda:
        nvcc = ["-O3", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        return cpp_extension.CUDAExtension(
            "entskip._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            define_macros=[("ENTSKIP_WITH_CUDA", "1")],
        )
    return cpp_extension.CppExtension("entskip._C", sources, extra_compile_args={"cxx": cxx})


setup(
    name="entskip",
    version="0.1.0",
    description="Fused entangled residual skips (y = alpha * x @ M^T + branch) for PyTorch",
    package_dir={"entskip": "python/entskip", "entskip.triton_kernels": "triton_kernels"},
    packages=["entskip", "entskip.bench", "entskip.experiments", "entskip.models", "entskip.triton_kernels"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
)
