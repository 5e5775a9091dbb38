"""Build entskip and its native library entskip._C.

The CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always built. The CUDA sources
(csrc/cuda/*.cu and their *.cpp glue) are built when the installed torch has CUDA and a
CUDA toolkit is found (CUDA_HOME, else the nvcc on PATH, else /usr/local/cuda), unless
ENTSKIP_NO_CUDA=1; a toolkit that cannot build them stops the build with the reason.
The CUDA kernels carry sm_80 and sm_90 machine code and compute_90 PTX.

The CPU kernels are compiled for the building machine's
instruction set (-march=native: a source build runs where it is built);
ENTSKIP_CPU_ARCH=x86-64-v3 (or any -march value) targets another, ENTSKIP_CPU_ARCH=
(empty) the compiler's default. They are compiled with OpenMP when torch's ATen uses it
(at::parallel_for is a header template: without -fopenmp it runs on one thread).
Install with

    pip install --no-build-isolation -e .
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


class CudaBuildError(RuntimeError):
    """The CUDA half of the build cannot be built here; the message says why and how to skip it."""

    def __init__(self, reason):
        super().__init__(f"entskip's CUDA build: {reason}. Set ENTSKIP_NO_CUDA=1 for a CPU-only build.")


def _is_toolkit(home):
    """Whether ``home`` is a CUDA toolkit root: ``bin/nvcc`` and ``include/cuda_runtime.h``."""
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "include", "cuda_runtime.h"))


def _toolkit_of_nvcc(nvcc):
    """The toolkit root of the ``nvcc`` on PATH, through symlinks and wrapper scripts, or None.

    A symlink resolves to ``<root>/bin/nvcc``; a wrapper script (``exec /opt/cuda/bin/nvcc "$@"``)
    does not, so nvcc itself is asked: its dry run prints ``TOP=<root>/bin/..``.
    """
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_toolkit(home):
        return home
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    home = os.path.realpath(match.group(1).strip()) if match else None
    return home if _is_toolkit(home) else None


def _cuda_home():
    """The CUDA toolkit to build with, or None where there is none.

    ``CUDA_HOME`` (or ``CUDA_PATH``) when set; else the real location of the ``nvcc`` on PATH
    (torch's own guess, ``dirname(dirname(which nvcc))``, is wrong for a wrapper in /usr/local/bin);
    else ``/usr/local/cuda``.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        if not _is_toolkit(home):
            raise CudaBuildError(f"CUDA_HOME={home} is not a CUDA toolkit (no bin/nvcc and include/cuda_runtime.h)")
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_of_nvcc(nvcc)
        if home is None:
            raise CudaBuildError(f"cannot find the toolkit of {nvcc} (set CUDA_HOME to the folder with bin/nvcc and include/)")
        return home
    return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None


def _wheel_roots():
    """Folders of the NVIDIA wheels that CUDA builds of torch install (``nvidia/cu13``, ``nvidia/cublas``, ...)."""
    try:
        import nvidia
    except ImportError:
        return []
    return [os.path.join(p, sub) for p in nvidia.__path__ for sub in ("cu13", "cu12", "cublas", "cuda_runtime")]


def _toolkit_lib_dir(home):
    """``lib64`` (or ``lib``) of the toolkit."""
    lib64 = os.path.join(home, "lib64")
    return lib64 if os.path.isdir(lib64) else os.path.join(home, "lib")


def _cudart(home, build_dir):
    """``library_dirs`` that make ``-lcudart`` (which CUDAExtension always adds) link.

    The toolkit's ``libcudart.so``; where the toolkit has none, the wheel's versioned
    ``libcudart.so.N`` behind a ``libcudart.so`` link made under ``build_dir`` (the library
    is found at run time by its soname, which torch has already loaded).
    """
    if glob.glob(os.path.join(_toolkit_lib_dir(home), "libcudart.so")):
        return [_toolkit_lib_dir(home)]
    for root in _wheel_roots():
        libs = sorted(glob.glob(os.path.join(root, "lib", "libcudart.so.*")))
        if libs:
            link_dir = os.path.join(build_dir, "cudart-link")
            os.makedirs(link_dir, exist_ok=True)
            link = os.path.join(link_dir, "libcudart.so")
            if os.path.lexists(link):
                os.remove(link)
            os.symlink(libs[0], link)
            return [link_dir]
    raise CudaBuildError(f"no libcudart.so in {_toolkit_lib_dir(home)} and no libcudart.so.N in the nvidia wheels")


def _cublaslt(home):
    """``(include_dirs, library_dirs, extra_link_args)`` for cuBLASLt (the dense CUDA path).

    From the CUDA toolkit when it ships cuBLAS, else from the ``nvidia-cublas`` wheel that
    CUDA builds of torch install, which has only the versioned ``libcublasLt.so.N``: linked by
    file name, with an rpath to its folder. The wheel's include folder also holds a
    ``cuda_runtime.h`` without the toolkit's ``crt/`` headers, so the toolkit's include folder
    goes before it.
    """
    lib_dir = _toolkit_lib_dir(home)
    if os.path.exists(os.path.join(home, "include", "cublasLt.h")) and glob.glob(os.path.join(lib_dir, "libcublasLt.so*")):
        return [], [lib_dir], ["-lcublasLt"]
    for root in _wheel_roots():
        libs = sorted(glob.glob(os.path.join(root, "lib", "libcublasLt.so*")))
        if os.path.exists(os.path.join(root, "include", "cublasLt.h")) and libs:
            wheel_lib = os.path.join(root, "lib")
            return ([os.path.join(home, "include"), os.path.join(root, "include")], [wheel_lib],
                    [f"-l:{os.path.basename(libs[0])}", f"-Wl,-rpath,{wheel_lib}"])
    raise CudaBuildError(f"cuBLASLt (cublasLt.h and libcublasLt) is in neither CUDA_HOME ({home}) nor the nvidia-cublas wheel")


def _wants_cuda():
    """The toolkit to build the CUDA sources with, or None for a CPU-only build.

    CPU-only when ENTSKIP_NO_CUDA=1, when torch has no CUDA, or when there is no nvcc (said
    on stderr). A CUDA torch with a toolkit that cannot build raises :class:`CudaBuildError`.
    """
    if os.environ.get("ENTSKIP_NO_CUDA", "0") == "1" or torch.version.cuda is None or not _sources("csrc/cuda/*.cu"):
        return None
    home = _cuda_home()
    if home is None:
        print(f"entskip: torch has CUDA {torch.version.cuda} but no nvcc is found (PATH, CUDA_HOME, /usr/local/cuda): "
              "building the CPU kernels only", file=sys.stderr)
        return None
    return home


# sm_80 and sm_90 machine code (no sm_90a: the kernels use mma.sync/ldmatrix/cp.async, no wgmma/TMA),
# plus compute_90 PTX that the driver compiles for newer GPUs. --threads=0: the targets compile in parallel.
NVCC_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                   "-gencode=arch=compute_90,code=compute_90"]


def _cuda_extension(home, sources, cxx, openmp):
    """The extension with the CUDA sources, built with the toolkit at ``home``.

    torch's cpp_extension reads its ``CUDA_HOME`` once at import; it is pointed at ``home``
    so that nvcc, the include folder and ``lib64`` all come from the same toolkit.
    """
    os.environ["CUDA_HOME"] = home
    cpp_extension.CUDA_HOME = home
    include_dirs, library_dirs, link_args = _cublaslt(home)
    library_dirs = _cudart(home, os.path.join(HERE, "build")) + library_dirs
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    return cpp_extension.CUDAExtension(
        "entskip._C",
        sources + cuda_sources,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--threads=0"] + NVCC_ARCH_FLAGS},
        define_macros=[("ENTSKIP_WITH_CUDA", "1")],
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        extra_link_args=link_args + openmp,
    )


def _extension():
    """entskip._C: the CPU kernels, and the CUDA kernels where :func:`_wants_cuda` finds a toolkit."""
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    arch = os.environ.get("ENTSKIP_CPU_ARCH", "native")
    cxx = ["-O3"] + ([f"-march={arch}"] if arch else [])
    # torch's libgomp is already loaded when entskip._C is, so -fopenmp shares its thread pool.
    # Linux only: Apple clang has no -fopenmp, and MSVC spells it /openmp.
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform.startswith("linux") else []
    cxx += openmp
    home = _wants_cuda()
    if home is not None:
        return _cuda_extension(home, sources, cxx, openmp)
    return cpp_extension.CppExtension("entskip._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)


def _ext_modules():
    """``[entskip._C]``; ``[]`` with ENTSKIP_PREBUILT=1, where an editable install (``pip install -e .``)
    uses the library already in python/entskip (bench/gpu_check.sh B reuses the one A built)."""
    if os.environ.get("ENTSKIP_PREBUILT", "0") != "1":
        return [_extension()]
    if not glob.glob(os.path.join(HERE, "python", "entskip", "_C.*")):
        raise RuntimeError("ENTSKIP_PREBUILT=1, but python/entskip holds no built entskip._C library")
    return []


# Project metadata, packages and version live in pyproject.toml; this file only builds entskip._C.
setup(
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
