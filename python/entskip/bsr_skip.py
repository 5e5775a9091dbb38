"""Block-sparse (BSR) skip-add op family: ``y = alpha * (x @ M^T) + branch``.

``torch.ops.entskip.bsr_skip_add`` (schema in ``csrc/ops.cpp``) with its fake kernel
and autograd formula, and :func:`bsr_skip_add`, which picks the backend. ``M`` is
``(R*b, C*b)`` with ``b x b`` blocks ``values (nnzb, b, b)`` placed by a validated
:class:`entskip.mappings.BlockLayout` (passed as its index tensors, so the op
sees only tensors). ``alpha`` is a 0-d floating tensor; the activations come in one
of two formats (``branch``, the result, ``grad`` and ``dx`` in ``x``'s):

- features last: ``x (N, C*b)``, ``branch (N, R*b)`` or ``None``; returns ``(N, R*b)``;
- features first: ``x (N, C*b, S)`` (an ``NCHW`` map with ``S = H * W``), ``branch
  (N, R*b, S)`` or ``None``; returns ``(N, R*b, S)``: per image and block row ``i``,
  ``y[n][i] = alpha * sum_k V_k @ x[n][col_k] + branch[n][i]`` (``[i]``: rows ``i*b`` to
  ``i*b + b - 1``).

Backward (``g = dL/dy``): ``dx = alpha * g @ M`` (features first: ``dx[n] = alpha * M^T @
g[n]``) through the transposed layout, ``dvalues = alpha * (g^T @ x)`` (``alpha * sum_n
g[n] @ x[n]^T``) sampled on M's blocks only, ``dalpha = <dvalues / alpha, values>`` from the
same sampled product, ``dbranch = g``.

On CUDA tensors the ops run :func:`gpu_forward` / :func:`gpu_backward`: the Triton or
the CUDA C++ kernels (:mod:`entskip.gpu_dispatch`). The Triton kernels take both formats
as they are; the CUDA C++ kernels take features last only, so features-first tensors are
copied to ``(N * S, D)`` and the results copied back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, devices, formats, gpu_dispatch, reference
from .autograd_once import run_once_differentiable


def bsr_skip_add(
    x: Tensor,
    values: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    ccol_indices: Tensor,
    row_indices: Tensor,
    perm: Tensor,
    branch: Tensor | None,
    alpha: Tensor,
) -> Tensor:
    """Run the BSR skip-add on the active backend (inputs and layout already validated; either format)."""
    if backends.resolve(x.device) == "reference":
        return reference.bsr_skip_add(x, values, crow_indices, col_indices, branch, alpha, features_first=x.dim() == 3)
    return torch.ops.entskip.bsr_skip_add(
        x.contiguous(),
        values.contiguous(),
        crow_indices,
        col_indices,
        ccol_indices,
        row_indices,
        perm,
        alpha,
        None if branch is None else branch.contiguous(),
    )


def gpu_forward(x, values, crow_indices, col_indices, ccol_indices, row_indices, perm, alpha, branch, backend):
    """The CUDA implementation of ``bsr_skip_add`` on ``backend`` (``"triton"`` or ``"cuda"``).

    Checks the arguments and the layout first. Under ``TRITON_INTERPRET=1`` the Triton
    kernels also run on CPU tensors (how CPU CI tests them). The CUDA C++ kernels get
    features-first tensors as features-last copies, and the result is copied back.
    """
    layout = (crow_indices, col_indices, ccol_indices, row_indices, perm)
    blocks = gpu_dispatch.TRITON_BLOCKS if backend == "triton" else None
    gpu_dispatch.check_bsr(x, values, *layout, alpha, branch=branch, block_sizes=blocks)
    gpu_dispatch.validate_layout(*layout, values.shape[-1])
    if backend == "cuda" and x.dim() == 3:
        return formats.rows_forward(lambda x2, b2: gpu_forward(x2, values, *layout, alpha, b2, backend), x, branch)
    if backend == "cuda":
        return torch.ops.entskip._cuda_bsr_skip_add(x, values, *layout, alpha, branch)
    return gpu_dispatch.triton_kernels().bsr_skip.forward(x, values, crow_indices, col_indices, alpha, branch)


def gpu_backward(grad, x, values, crow_indices, col_indices, ccol_indices, row_indices, perm, alpha, output_mask,
                 backend):
    """The CUDA implementation of ``bsr_skip_add_backward`` (see :func:`gpu_forward`)."""
    layout = (crow_indices, col_indices, ccol_indices, row_indices, perm)
    blocks = gpu_dispatch.TRITON_BLOCKS if backend == "triton" else None
    gpu_dispatch.check_bsr(x, values, *layout, alpha, grad=grad, block_sizes=blocks)
    gpu_dispatch.validate_layout(*layout, values.shape[-1])
    if backend == "cuda" and x.dim() == 3:
        return formats.rows_backward(
            lambda g2, x2: gpu_backward(g2, x2, values, *layout, alpha, output_mask, backend), grad, x)
    if backend == "cuda":
        return torch.ops.entskip._cuda_bsr_skip_add_backward(grad, x, values, *layout, alpha, output_mask)
    return gpu_dispatch.triton_kernels().bsr_skip.backward(grad, x, values, *layout, alpha, output_mask)


if backends.native_available():

    @torch.library.impl("entskip::bsr_skip_add", "CUDA")
    def _(x, values, crow_indices, col_indices, ccol_indices, row_indices, perm, alpha, branch):
        backend = gpu_dispatch.kernel_backend(x.device)
        return gpu_forward(x, values, crow_indices, col_indices, ccol_indices, row_indices, perm, alpha, branch, backend)

    @torch.library.impl("entskip::bsr_skip_add_backward", "CUDA")
    def _(grad, x, values, crow_indices, col_indices, ccol_indices, row_indices, perm, alpha, output_mask):
        backend = gpu_dispatch.kernel_backend(x.device)
        layout = (crow_indices, col_indices, ccol_indices, row_indices, perm)
        return gpu_backward(grad, x, values, *layout, alpha, output_mask, backend)

    # The fake kernels also serve the Meta key, which the dispatcher picks when any argument is a
    # meta tensor: a real x with a meta argument must fail here, not return uninitialised memory.
    @torch.library.register_fake("entskip::bsr_skip_add")
    def _(x, values, crow_indices, col_indices, ccol_indices, row_indices, perm, alpha, branch):
        devices.check_same(x, values=values, crow_indices=crow_indices, col_indices=col_indices,
                           ccol_indices=ccol_indices, row_indices=row_indices, perm=perm, alpha=alpha, branch=branch)
        return x.new_empty(formats.with_features(x, (crow_indices.shape[0] - 1) * values.shape[-1]))

    @torch.library.register_fake("entskip::bsr_skip_add_backward")
    def _(grad, x, values, crow_indices, col_indices, ccol_indices, row_indices, perm, alpha, output_mask):
        devices.check_same(x, grad=grad, values=values, crow_indices=crow_indices, col_indices=col_indices,
                           ccol_indices=ccol_indices, row_indices=row_indices, perm=perm, alpha=alpha)
        return (
            torch.empty_like(x) if output_mask[0] else None,
            torch.empty_like(values) if output_mask[1] else None,
            torch.empty_like(alpha) if output_mask[2] else None,
        )

    def _setup_context(ctx, inputs, output):
        x, values, *layout, alpha, _branch = inputs
        ctx.save_for_backward(x, values, *layout, alpha)

    def _backward(ctx, grad):
        x, values, *layout, alpha = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_x, need_values, need_alpha, need_branch = need[0], need[1], need[7], need[8]
        dx = dvalues = dalpha = None
        if need_x or need_values or need_alpha:
            dx, dvalues, dalpha = run_once_differentiable(
                (grad, x, values, alpha),
                lambda: torch.ops.entskip.bsr_skip_add_backward(
                    grad.contiguous(), x, values, *layout, alpha, [need_x, need_values, need_alpha]),
                "bsr_skip_add")
        return dx, dvalues, None, None, None, None, None, dalpha, grad if need_branch else None

    torch.library.register_autograd("entskip::bsr_skip_add", _backward, setup_context=_setup_context)
