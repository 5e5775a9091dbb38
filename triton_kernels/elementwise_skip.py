"""Triton kernels of the elementwise skips (identity and permutation) and their launchers.

    identity     y = alpha * x + branch              dx = alpha * g,  dalpha = sum(g * x)
    permutation  y[:, i] = alpha * x[:, index[i]] + branch[:, i]
                 dx[:, j] = alpha * g[:, inverse[j]],  dalpha = sum_j g[:, inverse[j]] * x[:, j]

One pass over memory each: :func:`_forward_kernel` reads ``x`` (gathered through
``index`` for a permutation) and ``branch`` and writes ``y``; :func:`_backward_kernel`
reads ``g`` (gathered through ``inverse``) and, only for dalpha, ``x``, writes ``dx`` and
one dalpha partial per program (float32, float64 for float64), which the launcher sums
in a fixed order: deterministic. Programs cover fixed ``ROWS x COLS`` tiles of the
``(N, D)`` problem (no autotuning: an elementwise kernel is memory bound at any
reasonable tile); rows are read with their stride, so row-strided inputs are not copied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning

ROWS, COLS, NUM_WARPS = 8, 256, 4  # a tile of 2048 elements: 16 per thread


@triton.jit
def _tile(idx_ptr, N, D, HAS_INDEX: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The program's ``ROWS x COLS`` tile of the ``(N, D)`` problem: its row and column
    offsets, its in-bounds mask and the source column of each column (``idx[col]``)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1).to(tl.int64) * COLS + tl.arange(0, COLS)
    col_ok = cols < D
    mask = (rows < N)[:, None] & col_ok[None, :]
    src = tl.load(idx_ptr + cols, mask=col_ok, other=0) if HAS_INDEX else cols
    return rows, cols, mask, src


@triton.jit
def _forward_kernel(
    x_ptr,
    idx_ptr,  # (D,) gather index; unused without HAS_INDEX
    branch_ptr,  # (N, D) with row stride stride_b; unused without HAS_BRANCH
    out_ptr,  # (N, D) contiguous
    alpha_ptr,
    N,
    D,
    stride_x,
    stride_b,
    HAS_INDEX: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    rows, cols, mask, src = _tile(idx_ptr, N, D, HAS_INDEX, ROWS, COLS)
    acc_dtype = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    x = tl.load(x_ptr + rows[:, None] * stride_x + src[None, :], mask=mask).to(acc_dtype)
    y = tl.load(alpha_ptr).to(acc_dtype) * x
    if HAS_BRANCH:
        y += tl.load(branch_ptr + rows[:, None] * stride_b + cols[None, :], mask=mask).to(acc_dtype)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    g_ptr,
    x_ptr,  # read only with DA
    idx_ptr,  # (D,) inverse permutation; unused without HAS_INDEX
    dx_ptr,  # (N, D) contiguous; unused without DX
    alpha_ptr,
    part_ptr,  # (programs,) dalpha partials; unused without DA
    N,
    D,
    stride_g,
    stride_x,
    HAS_INDEX: tl.constexpr,
    DX: tl.constexpr,
    DA: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    rows, cols, mask, src = _tile(idx_ptr, N, D, HAS_INDEX, ROWS, COLS)
    acc_dtype = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32
    g = tl.load(g_ptr + rows[:, None] * stride_g + src[None, :], mask=mask, other=0.0).to(acc_dtype)
    if DX:
        dx = tl.load(alpha_ptr).to(acc_dtype) * g
        tl.store(dx_ptr + rows[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if DA:
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(acc_dtype)
        pid = tl.program_id(0).to(tl.int64) * tl.num_programs(1) + tl.program_id(1)
        tl.store(part_ptr + pid, tl.sum(tl.sum(g * x, axis=1), axis=0))


def _rows(t: Tensor) -> Tensor:
    """``t (..., D)`` as ``(rows, D)`` with unit column stride: a view where possible, else a copy."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(1) == 1 or rows.shape[1] <= 1 else rows.contiguous()


def _grid(n: int, d: int) -> tuple[int, int]:
    return triton.cdiv(n, ROWS), triton.cdiv(d, COLS)


def _forward(x: Tensor, index: Tensor | None, alpha: Tensor, branch: Tensor | None) -> Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return out
    xr = _rows(x)
    br = xr if branch is None else _rows(branch)
    n, d = xr.shape
    _forward_kernel[_grid(n, d)](
        xr, xr if index is None else index, br, out, alpha, n, d, xr.stride(0), br.stride(0),
        HAS_INDEX=index is not None, HAS_BRANCH=branch is not None, ROWS=ROWS, COLS=COLS, num_warps=NUM_WARPS,
    )
    return out


def _backward(grad: Tensor, x: Tensor, inverse: Tensor | None, alpha: Tensor, output_mask):
    need_x, need_alpha = output_mask
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    dalpha = None
    d = x.shape[-1]
    n = x.numel() // d if d else 0
    rows_grid, cols_grid = _grid(n, d)
    partials = torch.zeros(rows_grid * cols_grid if need_alpha else 0, dtype=tuning.acc_dtype(x.dtype), device=x.device)
    if x.numel() > 0 and (need_x or need_alpha):
        gr = _rows(grad)
        xr = _rows(x) if need_alpha else gr
        _backward_kernel[_grid(n, d)](
            gr, xr, gr if inverse is None else inverse, gr if dx is None else dx, alpha, partials if need_alpha else gr,
            n, d, gr.stride(0), xr.stride(0),
            HAS_INDEX=inverse is not None, DX=need_x, DA=need_alpha, ROWS=ROWS, COLS=COLS, num_warps=NUM_WARPS,
        )
    if need_alpha:
        dalpha = partials.double().sum().to(alpha.dtype).reshape(alpha.shape)
    return dx, dalpha


def identity_forward(x: Tensor, alpha: Tensor, branch: Tensor | None) -> Tensor:
    """``y = alpha * x + branch`` for ``x (..., D)`` (``branch`` ``x``'s shape or ``None``)."""
    return _forward(x, None, alpha, branch)


def identity_backward(grad: Tensor, x: Tensor, alpha: Tensor, output_mask):
    """``(dx, dalpha)``; an entry is ``None`` where ``output_mask`` is false (``x`` read only for dalpha)."""
    return _backward(grad, x, None, alpha, output_mask)


def permutation_forward(x: Tensor, index: Tensor, alpha: Tensor, branch: Tensor | None) -> Tensor:
    """``y = alpha * x[..., index] + branch`` for a validated permutation ``index (D,)``."""
    return _forward(x, index, alpha, branch)


def permutation_backward(grad: Tensor, x: Tensor, inverse: Tensor, alpha: Tensor, output_mask):
    """``(dx, dalpha)`` with ``dx[..., j] = alpha * grad[..., inverse[j]]`` (see the module doc)."""
    return _backward(grad, x, inverse, alpha, output_mask)
