"""Backend selection for the entskip ops.

Backends (docs/design.md, "Backends and dispatch"):

- ``reference``: plain differentiable torch ops (:mod:`entskip.reference`), any device.
- ``cpu``: the fused C++ kernels of ``entskip._C`` (CPU tensors).
- ``triton``: the Triton kernels of :mod:`entskip.triton_kernels` (CUDA tensors; needs
  the ``triton`` package).
- ``cuda``: the CUDA C++ kernels of ``csrc/cuda`` (CUDA tensors; needs entskip built
  against a CUDA torch).
- ``auto`` (default): the fastest validated backend for the tensor's device: ``cpu`` for
  CPU tensors when ``entskip._C`` loaded, else ``reference``. For CUDA tensors ``auto``
  picks a GPU backend only once a GPU run has validated it (:data:`VALIDATED_GPU_BACKEND`);
  until then it runs ``reference``, and ``triton``/``cuda`` are opt-in.

``ENTSKIP_BACKEND=<name>`` sets the starting value; :func:`set_backend` and the
:func:`use_backend` context manager change it at run time.
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
_GPU_BACKENDS = ("triton", "cuda")
# The GPU backend ``auto`` runs on CUDA tensors. None: no GPU backend has passed the GPU
# test suite and benchmark (bench/gpu_check.sh) yet, so ``auto`` stays on ``reference``.
VALIDATED_GPU_BACKEND: str | None = None

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.entskip)

    NATIVE_ERROR: Exception | None = None
except ImportError as err:  # the package still works on the reference backend
    _C = None
    NATIVE_ERROR = err


def native_module():
    """The compiled library ``entskip._C``, ``None`` where it failed to load."""
    return _C


def native_available() -> bool:
    """Whether the compiled library ``entskip._C`` loaded (the ``cpu`` backend needs it)."""
    return NATIVE_ERROR is None


def _checked(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _checked(os.environ.get("ENTSKIP_BACKEND", "auto"))
# Whether CPU tensors run the C++ kernels under the selected backend (``auto`` or ``cpu``
# with entskip._C loaded): read by skip_add's short path, kept by set_backend.
native_cpu = _backend in ("auto", "cpu") and native_available()


def set_backend(name: str) -> None:
    """Select the backend used by every entskip op from now on (see the module doc)."""
    global _backend, native_cpu
    _backend = _checked(name)
    native_cpu = _backend in ("auto", "cpu") and native_available()


def get_backend() -> str:
    """The selected backend name (``auto`` unless changed)."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Run a block with another backend, restoring the previous one afterwards."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve(device: torch.device) -> str:
    """The concrete backend (``reference``, ``cpu``, ``triton`` or ``cuda``) for ``device``."""
    name = _backend
    if name == "auto":
        if device.type == "cpu" and native_available():
            return "cpu"
        if device.type == "cuda" and VALIDATED_GPU_BACKEND is not None:
            return VALIDATED_GPU_BACKEND
        return "reference"
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs CPU tensors only, but the input is on {device}")
        if not native_available():
            raise RuntimeError(f"backend 'cpu' needs the compiled library entskip._C, which failed to load: {NATIVE_ERROR}")
    if name in _GPU_BACKENDS:
        if device.type != "cuda":
            raise ValueError(f"backend {name!r} runs CUDA tensors only, but the input is on {device}")
        if not native_available():
            raise RuntimeError(f"backend {name!r} needs the op schemas of entskip._C, which failed to load: {NATIVE_ERROR}")
        from . import gpu_dispatch

        if name == "triton" and not gpu_dispatch.triton_available():
            raise RuntimeError("backend 'triton' needs the triton package (pip install triton)")
        if name == "cuda" and not gpu_dispatch.cuda_kernels_available():
            raise RuntimeError("backend 'cuda' needs entskip built against a CUDA build of torch (csrc/cuda)")
    return name
