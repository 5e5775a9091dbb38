"""Identity skip-add op family: ``y = alpha * x + branch`` (Zhang et al.'s decayed shortcut).

``torch.ops.entskip.identity_skip_add`` (schema in ``csrc/ops.cpp``, autograd in C++ in
``csrc/elementwise_autograd.cpp``) with its CUDA and fake kernels, and
:func:`identity_skip_add`, which picks the backend. Shapes:
``x (..., D)`` with any strides, ``branch`` ``x``'s shape or ``None``, ``alpha`` a 0-d
floating tensor; returns ``x``'s shape (contiguous) and dtype.

Backward (``g = dL/dy``): ``dx = alpha * g``; ``dalpha = sum(g * x)`` from the same pass
over ``g``, computed only when ``alpha`` needs a gradient (``x`` is saved only then), a
deterministic sum (float32 accumulation, float64 for float64); ``dbranch = g``, handed on
without a copy.

On CUDA tensors the ops run :func:`gpu_forward` / :func:`gpu_backward`: the Triton or the
CUDA C++ kernels (:mod:`entskip.gpu_dispatch`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, direct_calls, gpu_dispatch, reference


def identity_skip_add(x: Tensor, branch: Tensor | None, alpha: Tensor) -> Tensor:
    """Run the identity skip-add on the active backend (inputs already validated)."""
    if backends.resolve(x.device) == "reference":
        return reference.identity_skip_add(x, branch, alpha)
    return direct_calls.identity_skip_add(x, alpha, branch)


def gpu_forward(x, alpha, branch, backend):
    """The CUDA implementation of ``identity_skip_add`` on ``backend`` (``"triton"`` or ``"cuda"``).

    Checks the arguments first. Under ``TRITON_INTERPRET=1`` the Triton kernels also run
    on CPU tensors (how CPU CI tests them).
    """
    gpu_dispatch.check_elementwise(x, alpha, branch=branch)
    if backend == "cuda":
        return torch.ops.entskip._cuda_identity_skip_add(x, alpha, branch)
    return gpu_dispatch.triton_kernels().elementwise_skip.identity_forward(x, alpha, branch)


def gpu_backward(grad, x, alpha, output_mask, backend):
    """The CUDA implementation of ``identity_skip_add_backward`` (see :func:`gpu_forward`)."""
    gpu_dispatch.check_elementwise(x, alpha, grad=grad)
    if backend == "cuda":
        return torch.ops.entskip._cuda_identity_skip_add_backward(grad, x, alpha, output_mask)
    return gpu_dispatch.triton_kernels().elementwise_skip.identity_backward(grad, x, alpha, output_mask)


if backends.native_available():

    @torch.library.impl("entskip::identity_skip_add", "CUDA")
    def _(x, alpha, branch):
        return gpu_forward(x, alpha, branch, gpu_dispatch.kernel_backend(x.device))

    @torch.library.impl("entskip::identity_skip_add_backward", "CUDA")
    def _(grad, x, alpha, output_mask):
        return gpu_backward(grad, x, alpha, output_mask, gpu_dispatch.kernel_backend(x.device))

    @torch.library.register_fake("entskip::identity_skip_add")
    def _(x, alpha, branch):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("entskip::identity_skip_add_backward")
    def _(grad, x, alpha, output_mask):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else None,
            torch.empty_like(alpha) if output_mask[1] else None,
        )
