"""Permutation skip-add op family: ``y = alpha * x[..., index] + branch``.

``torch.ops.entskip.permutation_skip_add`` (schema in ``csrc/ops.cpp``, autograd in C++ in
``csrc/elementwise_autograd.cpp``) with its CUDA and fake kernels, and
:func:`permutation_skip_add`, which picks the backend.
``M[i, index[i]] = 1`` is a permutation matrix; ``inverse`` is its inverse permutation
(``inverse[index[i]] = i``, cached by :class:`entskip.mappings.PermutationMapping`).
Shapes: ``x (..., D)`` with any strides, ``index`` and ``inverse`` ``(D,)`` int64,
``branch`` ``x``'s shape or ``None``, ``alpha`` a 0-d floating tensor; returns ``x``'s
shape (contiguous) and dtype.

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

from . import backends, gpu_dispatch, reference


def permutation_skip_add(x: Tensor, index: Tensor, inverse: Tensor, branch: Tensor | None, alpha: Tensor) -> Tensor:
    """Run the permutation skip-add on the active backend (inputs already validated)."""
    if backends.resolve(x.device) == "reference":
        return reference.permutation_skip_add(x, index, branch, alpha)
    return torch.ops.entskip.permutation_skip_add(x, index, inverse, alpha, branch)


def gpu_forward(x, index, inverse, alpha, branch, backend):
    """The CUDA implementation of ``permutation_skip_add`` on ``backend`` (``"triton"`` or ``"cuda"``).

    Checks the arguments and (once per index tensor and version) the permutation first.
    Under ``TRITON_INTERPRET=1`` the Triton kernels also run on CPU tensors.
    """
    gpu_dispatch.check_elementwise(x, alpha, branch=branch)
    gpu_dispatch.validate_permutation(index, inverse, x)
    if backend == "cuda":
        return torch.ops.entskip._cuda_permutation_skip_add(x, index, inverse, alpha, branch)
    return gpu_dispatch.triton_kernels().elementwise_skip.permutation_forward(x, index, alpha, branch)


def gpu_backward(grad, x, index, inverse, alpha, output_mask, backend):
    """The CUDA implementation of ``permutation_skip_add_backward`` (see :func:`gpu_forward`)."""
    gpu_dispatch.check_elementwise(x, alpha, grad=grad)
    gpu_dispatch.validate_permutation(index, inverse, x)
    if backend == "cuda":
        return torch.ops.entskip._cuda_permutation_skip_add_backward(grad, x, index, inverse, alpha, output_mask)
    return gpu_dispatch.triton_kernels().elementwise_skip.permutation_backward(grad, x, inverse, alpha, output_mask)


if backends.native_available():

    @torch.library.impl("entskip::permutation_skip_add", "CUDA")
    def _(x, index, inverse, alpha, branch):
        return gpu_forward(x, index, inverse, alpha, branch, gpu_dispatch.kernel_backend(x.device))

    @torch.library.impl("entskip::permutation_skip_add_backward", "CUDA")
    def _(grad, x, index, inverse, alpha, output_mask):
        return gpu_backward(grad, x, index, inverse, alpha, output_mask, gpu_dispatch.kernel_backend(x.device))

    @torch.library.register_fake("entskip::permutation_skip_add")
    def _(x, index, inverse, alpha, branch):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("entskip::permutation_skip_add_backward")
    def _(grad, x, index, inverse, alpha, output_mask):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else None,
            torch.empty_like(alpha) if output_mask[1] else None,
        )
