"""Dense skip-add op family: ``y = alpha * (x @ W^T) + branch``.

``torch.ops.entskip.dense_skip_add`` (schema in ``csrc/ops.cpp``) with its fake kernel
and autograd formula, and :func:`dense_skip_add`, which picks the backend. Shapes:
``weight (D_out, D_in)``, ``alpha`` 0-d floating tensor, and activations in one of two
formats (``branch``, the result, ``grad`` and ``dx`` in ``x``'s):

- features last: ``x (N, D_in)``, ``branch (N, D_out)`` or ``None``; returns ``(N, D_out)``;
- features first: ``x (N, D_in, S)`` (an ``NCHW`` map with ``S = H * W``), ``branch
  (N, D_out, S)`` or ``None``; returns ``(N, D_out, S)`` with ``y[n] = alpha * W @ x[n] +
  branch[n]``.

Backward (``g = dL/dy``): ``dx = alpha * g @ W`` (features first: ``dx[n] = alpha * W^T @
g[n]``), ``dW = alpha * g^T @ x`` (``alpha * sum_n g[n] @ x[n]^T``), ``dalpha = <dW / alpha,
W>``, ``dbranch = g``.

On CUDA tensors the ops run :func:`gpu_forward` / :func:`gpu_backward`: the Triton or
the CUDA C++ kernels (:mod:`entskip.gpu_dispatch`). The Triton kernels take both formats
as they are; the CUDA C++ kernels take features last only, so features-first tensors are
copied to ``(N * S, D)`` and the results copied back (:mod:`entskip.formats`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, devices, formats, gpu_dispatch, reference
from .autograd_once import run_once_differentiable


def dense_skip_add(x: Tensor, weight: Tensor, branch: Tensor | None, alpha: Tensor) -> Tensor:
    """Run the dense skip-add on the active backend (inputs already validated; either format)."""
    if backends.resolve(x.device) == "reference":
        return reference.skip_add(x, weight, branch, alpha, features_first=x.dim() == 3)
    return torch.ops.entskip.dense_skip_add(
        x.contiguous(), weight.contiguous(), alpha, None if branch is None else branch.contiguous()
    )


def gpu_forward(x, weight, alpha, branch, backend):
    """The CUDA implementation of ``dense_skip_add`` on ``backend`` (``"triton"`` or ``"cuda"``).

    Checks the arguments first. Under ``TRITON_INTERPRET=1`` the Triton kernels also run
    on CPU tensors (how CPU CI tests them). The CUDA C++ kernels get features-first
    tensors as features-last copies, and the result is copied back.
    """
    gpu_dispatch.check_dense(x, weight, alpha, branch=branch)
    if backend == "cuda" and x.dim() == 3:
        return formats.rows_forward(lambda x2, b2: gpu_forward(x2, weight, alpha, b2, backend), x, branch)
    if backend == "cuda":
        return torch.ops.entskip._cuda_dense_skip_add(x, weight, alpha, branch)
    return gpu_dispatch.triton_kernels().dense_skip.forward(x, weight, alpha, branch)


def gpu_backward(grad, x, weight, alpha, output_mask, backend):
    """The CUDA implementation of ``dense_skip_add_backward`` (see :func:`gpu_forward`)."""
    gpu_dispatch.check_dense(x, weight, alpha, grad=grad)
    if backend == "cuda" and x.dim() == 3:
        return formats.rows_backward(lambda g2, x2: gpu_backward(g2, x2, weight, alpha, output_mask, backend), grad, x)
    if backend == "cuda":
        return torch.ops.entskip._cuda_dense_skip_add_backward(grad, x, weight, alpha, output_mask)
    return gpu_dispatch.triton_kernels().dense_skip.backward(grad, x, weight, alpha, output_mask)


if backends.native_available():

    @torch.library.impl("entskip::dense_skip_add", "CUDA")
    def _(x, weight, alpha, branch):
        return gpu_forward(x, weight, alpha, branch, gpu_dispatch.kernel_backend(x.device))

    @torch.library.impl("entskip::dense_skip_add_backward", "CUDA")
    def _(grad, x, weight, alpha, output_mask):
        return gpu_backward(grad, x, weight, alpha, output_mask, gpu_dispatch.kernel_backend(x.device))

    # The fake kernels also serve the Meta key, which the dispatcher picks when any argument is a
    # meta tensor: a real x with a meta argument must fail here, not return uninitialised memory.
    @torch.library.register_fake("entskip::dense_skip_add")
    def _(x, weight, alpha, branch):
        devices.check_same(x, weight=weight, alpha=alpha, branch=branch)
        return x.new_empty(formats.with_features(x, weight.shape[0]))

    @torch.library.register_fake("entskip::dense_skip_add_backward")
    def _(grad, x, weight, alpha, output_mask):
        devices.check_same(x, grad=grad, weight=weight, alpha=alpha)
        return (
            torch.empty_like(x) if output_mask[0] else None,
            torch.empty_like(weight) if output_mask[1] else None,
            torch.empty_like(alpha) if output_mask[2] else None,
        )

    def _setup_context(ctx, inputs, output):
        x, weight, alpha, _branch = inputs
        ctx.save_for_backward(x, weight, alpha)

    def _backward(ctx, grad):
        x, weight, alpha = ctx.saved_tensors
        need_x, need_w, need_alpha, need_branch = ctx.needs_input_grad
        dx = dw = dalpha = None
        if need_x or need_w or need_alpha:
            dx, dw, dalpha = run_once_differentiable(
                (grad, x, weight, alpha),
                lambda: torch.ops.entskip.dense_skip_add_backward(
                    grad.contiguous(), x, weight, alpha, [need_x, need_w, need_alpha]),
                "dense_skip_add")
        return dx, dw, dalpha, grad if need_branch else None

    torch.library.register_autograd("entskip::dense_skip_add", _backward, setup_context=_setup_context)
