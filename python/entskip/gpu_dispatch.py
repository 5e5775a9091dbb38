"""The GPU kernel backends behind the CUDA implementations of the entskip ops.

Each public op has one CUDA implementation (registered in its op-family file,
:mod:`entskip.bsr_skip` and :mod:`entskip.dense_skip`; two registrations for one key
would collide: docs/design.md, "Decisions and why"). It runs the kernels of :func:`kernel_backend`:

- ``triton``: :mod:`entskip.triton_kernels` (needs the ``triton`` package);
- ``cuda``: the CUDA C++ kernels ``torch.ops.entskip._cuda_*`` (``csrc/cuda/``, built
  when the installed torch has CUDA).

Both trust their layout, so :func:`validate_layout` checks every layout on the host
once (a device-to-host copy the first time a layout is seen) and remembers it by the
identity and version of its index tensors (identity alone for inference tensors, which
have no version counter): later calls, CUDA graph capture included, do not synchronise.
Argument checks (:func:`check_bsr`, :func:`check_dense`) raise a ``ValueError``/``TypeError``
naming the argument before any kernel is launched.

The BSR and dense ops take activations in one of two layouts, and every activation of a
call (``x``, ``branch``, ``grad``) in ``x``'s: features-last ``(rows, D)`` or features-first
``(N, D, S)`` (``NCHW`` viewed as ``(N, C, H*W)``), each contiguous in that shape.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from . import backends, formats, versions

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
TRITON_BLOCKS = (16, 32, 64)  # power-of-two tiles of at least 16 (tl.dot) that fit without spills


@functools.cache
def triton_kernels():
    """The ``entskip.triton_kernels`` package; ``ImportError`` when triton is missing."""
    return importlib.import_module("entskip.triton_kernels")


def triton_available() -> bool:
    """Whether the Triton kernels import (the ``triton`` package is installed)."""
    try:
        triton_kernels()
    except ImportError:
        return False
    return True


def cuda_kernels_available() -> bool:
    """Whether entskip._C was built with the CUDA C++ kernels."""
    return backends.native_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "entskip::_cuda_bsr_skip_add", "CUDA"
    )


def kernel_backend(device: torch.device) -> str:
    """``"triton"`` or ``"cuda"``: the selected GPU backend, or for ``auto``/``reference``
    (a direct call of ``torch.ops.entskip.*`` on CUDA tensors) the first one available."""
    name = backends.resolve(device)
    if name in ("triton", "cuda"):
        return name
    if triton_available():
        return "triton"
    if cuda_kernels_available():
        return "cuda"
    raise RuntimeError("no GPU kernels available: install triton or build entskip with CUDA")


def _check_tensor(t: Tensor, name: str, device: torch.device, dtype: torch.dtype | None = None) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (its {t.dim()}-D shape {tuple(t.shape)} in row-major order), "
                         f"got strides {t.stride()}")


def _check_matrix(t: Tensor, name: str, device: torch.device, dtype: torch.dtype | None = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    _check_tensor(t, name, device, dtype)


def _check_activations(x: Tensor) -> None:
    """``x`` is features-last ``(rows, D_in)`` or features-first ``(N, D_in, S)``, contiguous."""
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be 2-D (rows, D_in) features-last or 3-D (N, D_in, S) features-first, "
                         f"got shape {tuple(x.shape)}")
    _check_tensor(x, "x", x.device)


def _check_alpha(alpha: Tensor, device: torch.device) -> None:
    if alpha.dim() != 0 or not alpha.dtype.is_floating_point:
        raise ValueError(f"alpha must be a 0-d floating tensor, got {alpha.dtype} of shape {tuple(alpha.shape)}")
    if alpha.device != device:
        raise ValueError(f"alpha is on {alpha.device} but x is on {device}")


def _check_rows(t: Tensor | None, name: str, x: Tensor, features: int) -> None:
    """``t`` is ``x``'s layout with ``features`` features: ``(rows, features)`` or ``(N, features, S)``."""
    if t is None:
        return
    expected = tuple(formats.with_features(x, features))
    if tuple(t.shape) != expected:
        layout = "(rows, D_out) like x (rows, D_in)" if x.dim() == 2 else "(N, D_out, S) like x (N, D_in, S)"
        raise ValueError(f"{name} must have shape {expected}, {layout}, got {tuple(t.shape)}")
    _check_tensor(t, name, x.device, x.dtype)


def check_dense(x: Tensor, weight: Tensor, alpha: Tensor, branch: Tensor | None = None, grad: Tensor | None = None):
    """Checks the arguments of the dense ops: ``x (rows, D_in)`` or ``(N, D_in, S)``,
    ``weight (D_out, D_in)``, ``branch``/``grad`` ``(rows, D_out)`` or ``(N, D_out, S)``;
    all contiguous."""
    _check_activations(x)
    _check_matrix(weight, "weight", x.device, x.dtype)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have {x.shape[1]} columns (x's features), got shape {tuple(weight.shape)}")
    _check_alpha(alpha, x.device)
    _check_rows(branch, "branch", x, weight.shape[0])
    _check_rows(grad, "grad", x, weight.shape[0])


def check_bsr(x, values, crow, col, ccol, row, perm, alpha, branch=None, grad=None, block_sizes=None) -> None:
    """Checks the arguments of the BSR ops (shapes as in ``csrc/ops.cpp``; ``x`` also
    features-first ``(N, C*b, S)``, ``branch``/``grad`` then ``(N, R*b, S)``; all contiguous);
    ``block_sizes`` lists the block sizes the chosen kernels support."""
    _check_activations(x)
    if values.dim() != 3 or values.shape[1] != values.shape[2] or values.shape[1] == 0:
        raise ValueError(f"values must have shape (nnzb, b, b), got {tuple(values.shape)}")
    if values.dtype != x.dtype:
        raise TypeError(f"values has dtype {values.dtype} but x has dtype {x.dtype}")
    if values.device != x.device or not values.is_contiguous():
        raise ValueError(f"values must be a contiguous tensor on {x.device}")
    b = values.shape[-1]
    if block_sizes is not None and b not in block_sizes:
        raise ValueError(f"block size {b} is not supported by these kernels (supported: {block_sizes})")
    if x.shape[1] % b:
        raise ValueError(f"x has {x.shape[1]} features, not divisible by the block size {b}")
    nnzb = values.shape[0]
    for t, name, n in [(crow, "crow_indices", None), (col, "col_indices", nnzb), (ccol, "ccol_indices", None),
                       (row, "row_indices", nnzb), (perm, "perm", nnzb)]:
        if t.dim() != 1 or t.dtype != torch.int64 or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"{name} must be a contiguous 1-D int64 tensor on {x.device}")
        if n is not None and t.numel() != n:
            raise ValueError(f"{name} must have {n} entries, got {t.numel()}")
    nrows, ncols = crow.numel() - 1, ccol.numel() - 1
    if nrows < 0:
        raise ValueError("crow_indices must not be empty")
    if ncols < 0:
        raise ValueError("ccol_indices must not be empty")
    if x.shape[1] != ncols * b:
        raise ValueError(f"x has {x.shape[1]} features but the layout has {ncols} block columns of {b} "
                         f"({ncols * b} features), x of shape {tuple(x.shape)}")
    _check_alpha(alpha, x.device)
    _check_rows(branch, "branch", x, nrows * b)
    _check_rows(grad, "grad", x, nrows * b)


def validate_layout(crow: Tensor, col: Tensor, ccol: Tensor, row: Tensor, perm: Tensor, block: int) -> None:
    """Raise ``ValueError`` unless the index tensors form a valid layout and its exact
    transpose: :func:`entskip.layout.validate` (checked on the host the first time, then
    remembered while none of the five tensors changes)."""
    from . import layout  # layout imports reference only; kept local for import order

    layout.validate(crow, col, ccol, row, perm, block)


def check_elementwise(x: Tensor, alpha: Tensor, branch: Tensor | None = None, grad: Tensor | None = None) -> None:
    """Checks the arguments of the elementwise skips (identity, permutation): ``x (..., D)``
    of any strides, ``branch`` and ``grad`` of ``x``'s shape, dtype and device."""
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the features)")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    _check_alpha(alpha, x.device)
    for t, name in ((branch, "branch"), (grad, "grad")):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")


def validate_permutation(index: Tensor, inverse: Tensor, x: Tensor) -> None:
    """Raise ``ValueError`` unless ``index`` is a permutation of ``0..D-1`` (``D`` = x's
    features) and ``inverse`` its inverse. Checked on the host the first time, then
    remembered while neither tensor changes (later calls do not synchronise)."""
    d = x.shape[-1]
    for t, name in ((index, "index"), (inverse, "inverse")):
        if t.dim() != 1 or t.dtype != torch.int64 or not t.is_contiguous() or t.device != x.device:
            raise ValueError(f"{name} must be a contiguous 1-D int64 tensor on {x.device}")
        if t.numel() != d:
            raise ValueError(f"{name} must have {d} entries (x's features), got {t.numel()}")
    if versions.is_current((index, inverse), "permutation"):
        return
    i, v = index.cpu(), inverse.cpu()
    if not torch.equal(torch.sort(i).values, torch.arange(d)):
        raise ValueError(f"index must be a permutation of 0..{d - 1}")
    if not torch.equal(v[i], torch.arange(d)):
        raise ValueError("inverse is not the inverse permutation of index")
    versions.remember((index, inverse), "permutation")
