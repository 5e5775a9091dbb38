"""Permutation skip-add op family: ``y = alpha * x[..., index] + branch``.

``torch.ops.entskip.permutation_skip_add`` (schema in ``csrc/ops.cpp``, autograd in C++ in
``csrc/elementwise_autograd.cpp``) with its CUDA and fake kernels, and
:func:`permutation_skip_add`, which picks the backend.
``M[i, index[i]] = 1`` is a permutation matrix; ``inverse`` is its inverse permutation
(``inverse[index[i]] = i``, cached by :class:`entskip.mappings.PermutationMapping`).
Shapes: ``x (..., D)`` with any strides, ``index`` and ``inverse`` ``(D,)`` int64,
``branch`` ``x``'s shape or ``None``, ``alpha`` a 0-d floating tensor; returns ``x``'s
shape (contiguous) and dtype. With ``features_first=True``, ``x`` is ``(N, D, S)`` (an NCHW
map viewed as ``(N, C, H * W)``) and the permutation acts on dim 1:
``y[n, i, s] = alpha * x[n, index[i], s] + branch[n, i, s]``. The CPU kernel reads each
``(n, i)`` row of ``S`` positions whole from its source row, without copies; the CUDA
backends run the features-last kernels on the transposed view and copy the result back
into ``(N, D, S)``.

Backward (``g = dL/dy``): ``dx[..., j] = alpha * g[..., inverse[j]]`` (a gather through
the inverse permutation, so ``dx`` is written in order); ``dalpha = sum_j g[..., inverse[j]]
* x[..., j]`` from the same pass, only when ``alpha`` needs a gradient, a deterministic sum;
``dbranch = g``, without a copy.

On CUDA tensors the ops run :func:`gpu_forward` / :func:`gpu_backward`: the Triton or the
CUDA C++ kernels (:mod:`entskip.gpu_dispatch`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, direct_calls, gpu_dispatch, reference


def permutation_skip_add(x: Tensor, index: Tensor, inverse: Tensor, branch: Tensor | None, alpha: Tensor,
                         features_first: bool = False) -> Tensor:
    """Run the permutation skip-add on the active backend (inputs already validated)."""
    if backends.resolve(x.device) == "reference":
        if features_first:
            return _swapped_back(reference.permutation_skip_add(x.transpose(1, 2), index, _swapped(branch), alpha))
        return reference.permutation_skip_add(x, index, branch, alpha)
    if features_first:
        return torch.ops.entskip.permutation_skip_add(x, index, inverse, alpha, branch, True)
    return direct_calls.permutation_skip_add(x, index, inverse, alpha, branch)


def _swapped(t: Tensor | None) -> Tensor | None:
    """``t`` with dims 1 and 2 swapped (a view), ``None`` for ``None``."""
    return None if t is None else t.transpose(1, 2)


def _swapped_back(t: Tensor | None) -> Tensor | None:
    """A features-last ``(N, S, D)`` result as a contiguous ``(N, D, S)`` tensor, ``None`` for ``None``."""
    return None if t is None else t.transpose(1, 2).contiguous()


def gpu_forward(x, index, inverse, alpha, branch, backend, features_first=False):
    """The CUDA implementation of ``permutation_skip_add`` on ``backend`` (``"triton"`` or ``"cuda"``).

    Checks the arguments and (once per index tensor and version) the permutation first.
    Under ``TRITON_INTERPRET=1`` the Triton kernels also run on CPU tensors. Features
    first, the kernels run on the transposed view and the result is copied back.
    """
    if features_first:
        _check_features_first(x)
        return _swapped_back(gpu_forward(x.transpose(1, 2), index, inverse, alpha, _swapped(branch), backend))
    gpu_dispatch.check_elementwise(x, alpha, branch=branch)
    gpu_dispatch.validate_permutation(index, inverse, x)
    if backend == "cuda":
        return torch.ops.entskip._cuda_permutation_skip_add(x, index, inverse, alpha, branch)
    return gpu_dispatch.triton_kernels().elementwise_skip.permutation_forward(x, index, alpha, branch)


def gpu_backward(grad, x, index, inverse, alpha, output_mask, backend, features_first=False):
    """The CUDA implementation of ``permutation_skip_add_backward`` (see :func:`gpu_forward`)."""
    if features_first:
        _check_features_first(x)
        dx, dalpha = gpu_backward(grad.transpose(1, 2), x.transpose(1, 2), index, inverse, alpha, output_mask, backend)
        return _swapped_back(dx), dalpha
    gpu_dispatch.check_elementwise(x, alpha, grad=grad)
    gpu_dispatch.validate_permutation(index, inverse, x)
    if backend == "cuda":
        return torch.ops.entskip._cuda_permutation_skip_add_backward(grad, x, index, inverse, alpha, output_mask)
    return gpu_dispatch.triton_kernels().elementwise_skip.permutation_backward(grad, x, inverse, alpha, output_mask)


def _check_features_first(x: Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"a features-first x must be (N, D, S), got shape {tuple(x.shape)}")


if backends.native_available():

    @torch.library.impl("entskip::permutation_skip_add", "CUDA")
    def _(x, index, inverse, alpha, branch, features_first=False):
        return gpu_forward(x, index, inverse, alpha, branch, gpu_dispatch.kernel_backend(x.device), features_first)

    @torch.library.impl("entskip::permutation_skip_add_backward", "CUDA")
    def _(grad, x, index, inverse, alpha, output_mask, features_first=False):
        return gpu_backward(grad, x, index, inverse, alpha, output_mask, gpu_dispatch.kernel_backend(x.device),
                            features_first)

    @torch.library.register_fake("entskip::permutation_skip_add")
    def _(x, index, inverse, alpha, branch, features_first=False):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("entskip::permutation_skip_add_backward")
    def _(grad, x, index, inverse, alpha, output_mask, features_first=False):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else None,
            torch.empty_like(alpha) if output_mask[1] else None,
        )
