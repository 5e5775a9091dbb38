"""The pure-PyTorch oracle every entskip kernel is tested against.

Plain differentiable torch ops on any device and dtype; nothing here is fused or fast.
All functions take activations with the features last, ``x`` of shape ``(..., D_in)``,
and compute

    y = alpha * (x @ M^T) + branch          (branch optional, shape (..., D_out))

:func:`skip_add` and :func:`bsr_skip_add` also take the ops' features-first format with
``features_first=True``: ``x (N, D_in, S)``, ``branch`` and the result ``(N, D_out, S)``,

    y[n] = alpha * (M @ x[n]) + branch[n]
"""

from __future__ import annotations

import torch
from torch import Tensor


def skip_add(x: Tensor, matrix: Tensor, branch: Tensor | None = None, alpha: Tensor | float = 1.0, *,
             features_first: bool = False) -> Tensor:
    """``alpha * (x @ matrix^T) + branch`` for a dense ``matrix`` of shape ``(D_out, D_in)``;
    with ``features_first``, ``alpha * (matrix @ x[n]) + branch[n]`` for ``x (N, D_in, S)``."""
    y = alpha * (matrix @ x if features_first else x @ matrix.mT)
    return y if branch is None else y + branch


def block_rows(crow_indices: Tensor) -> Tensor:
    """Block row of every stored block: ``(nnzb,)`` from ``crow_indices`` ``(R + 1,)``."""
    counts = crow_indices.diff()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=crow_indices.device), counts)


def bsr_to_dense(values: Tensor, crow_indices: Tensor, col_indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """Dense ``(D_out, D_in)`` matrix of a BSR mapping; differentiable in ``values``.

    ``values`` is ``(nnzb, b, b)``; block ``k`` sits at block row ``r`` with
    ``crow_indices[r] <= k < crow_indices[r + 1]`` and block column ``col_indices[k]``.
    """
    b = values.shape[-1]
    nrows, ncols = shape[0] // b, shape[1] // b
    blocks = values.new_zeros(nrows, ncols, b, b)
    blocks = blocks.index_put((block_rows(crow_indices), col_indices), values)
    return blocks.permute(0, 2, 1, 3).reshape(shape)


def bsr_skip_add(
    x: Tensor,
    values: Tensor,
    crow_indices: Tensor,
    col_indices: Tensor,
    branch: Tensor | None = None,
    alpha: Tensor | float = 1.0,
    *,
    features_first: bool = False,
) -> Tensor:
    """``alpha * (x @ M^T) + branch`` for the BSR mapping ``M`` (see :func:`bsr_to_dense`);
    with ``features_first``, ``x (N, D_in, S)`` and the result ``(N, D_out, S)`` (computed on
    ``x.mT``, the same sums).

    Sparse semantics: only stored blocks take part, so a NaN or Inf in ``x`` reaches
    only the outputs of block rows that store a block in its column (a structural zero
    contributes nothing, as in ``torch.sparse``), unlike a dense ``x @ M^T``. Reduced
    precisions (bfloat16, float16) accumulate in float32, like the kernels.
    """
    if features_first:
        rb = None if branch is None else branch.mT
        return bsr_skip_add(x.mT, values, crow_indices, col_indices, rb, alpha).mT
    b = values.shape[-1]
    nrows = crow_indices.numel() - 1
    acc = torch.promote_types(x.dtype, torch.float32)  # reduced precisions accumulate in float32
    xb = x.to(acc).reshape(*x.shape[:-1], x.shape[-1] // b, b)
    products = torch.einsum("...kc,kjc->...kj", xb.index_select(-2, col_indices), values.to(acc))
    y = products.new_zeros(*x.shape[:-1], nrows, b).index_add(-2, block_rows(crow_indices), products)
    y = alpha * y.reshape(*x.shape[:-1], nrows * b)
    return (y if branch is None else y + branch).to(x.dtype)


def permutation_skip_add(x: Tensor, index: Tensor, branch: Tensor | None = None, alpha: Tensor | float = 1.0) -> Tensor:
    """``alpha * x[..., index] + branch``: the permutation matrix ``M[i, index[i]] = 1``."""
    y = alpha * x.index_select(-1, index)
    return y if branch is None else y + branch


def identity_skip_add(x: Tensor, branch: Tensor | None = None, alpha: Tensor | float = 1.0) -> Tensor:
    """``alpha * x + branch``: the ordinary (or depth-decayed) residual."""
    y = alpha * x
    return y if branch is None else y + branch
