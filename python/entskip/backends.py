"""Backend selection for the entskip ops.

Backends (DESIGN section 4):

- ``reference``: plain differentiable torch ops (:mod:`entskip.reference`), any device.
- ``cpu``: the fused C++ kernels of ``entskip._C`` (CPU tensors).
- ``triton`` / ``cuda``: the GPU kernels; not part of this build yet, asking for them
  raises an error instead of silently running something else.
- ``auto`` (default): the fastest validated backend for the tensor's device: ``cpu`` for
  CPU tensors when ``entskip._C`` loaded, else ``reference``.

``ENTSKIP_BACKEND=<name>`` sets the starting value; :func:`set_backend` and the
:func:`use_backend` context manager change it at run time.
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
_GPU_BACKENDS = ("triton", "cuda")

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.entskip)

    NATIVE_ERROR: Exception | None = None
except ImportError as err:  # the package still works on the reference backend
    NATIVE_ERROR = err


def native_available() -> bool:
    """Whether the compiled library ``entskip._C`` loaded (the ``cpu`` backend needs it)."""
    return NATIVE_ERROR is None


def _checked(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


_backend = _checked(os.environ.get("ENTSKIP_BACKEND", "auto"))


def set_backend(name: str) -> None:
    """Select the backend used by every entskip op from now on (see the module doc)."""
    global _backend
    _backend = _checked(name)


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
    """The concrete backend (``reference`` or ``cpu``) that runs tensors on ``device``."""
    name = _backend
    if name == "auto":
        return "cpu" if device.type == "cpu" and native_available() else "reference"
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' runs CPU tensors only, but the input is on {device}")
        if not native_available():
            raise RuntimeError(f"backend 'cpu' needs the compiled library entskip._C, which failed to load: {NATIVE_ERROR}")
    if name in _GPU_BACKENDS:
        raise NotImplementedError(
            f"backend {name!r} is not built in this version of entskip; use 'auto' or 'reference'"
        )
    return name
