"""Triton kernels of the block-sparse (BSR) skip-add family and their launchers.

    forward   y[:, i]  = alpha * sum_{k in row i} x[:, col[k]] @ V_k^T + branch[:, i]
    dx        dx[:, j] = alpha * sum_{t in col j} g[:, row[t]] @ V_{perm[t]}
    sampled   S_k      = g[:, row(k)]^T @ x[:, col[k]]            (b x b, M's blocks only)
              dV_k     = alpha * S_k,   dalpha = sum_k <S_k, V_k>

``[:, i]`` is the i-th group of ``b`` features. Forward and dx are one kernel
(:func:`_block_row_kernel`): a program owns ``BM`` rows of one output block column,
walks the blocks of its compressed row with ``tl.dot`` (fp32 accumulation, float64
for float64), applies alpha and the residual add in the epilogue and writes its tile
once. Programs are ordered output block first, so the programs running together read
the same rows of ``x`` and share them through L2. The sampled product
(:func:`_sampled_kernel`) splits N into ``SPLIT`` chunks, writes one float32 partial
per (chunk, block) and sums the partials in a fixed order: deterministic, no atomics.

Shapes: ``x (N, C*b)``, ``values (nnzb, b, b)``, ``branch``/``y (N, R*b)``; layout as in
:class:`entskip.BlockLayout`. All tensors contiguous, on one device, layout validated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning

BLOCK_ROW_CONFIGS = [
    triton.Config({"BM": bm}, num_warps=w, num_stages=s)
    for bm, w, s in [(64, 4, 3), (128, 4, 3), (128, 8, 4), (256, 8, 3), (64, 8, 2)]
]
SAMPLED_CONFIGS = [
    triton.Config({"BN": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(64, 4, 3), (128, 4, 3), (256, 8, 3), (64, 8, 2)]
]


# float64 is a correctness path (FMA dots): per block size, the config that compiles
# without spills on both supported triton releases (3.6 and 3.9; see the AOT check).
FLOAT64_BLOCK_ROW = {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 8, 2)}
FLOAT64_SAMPLED = (64, 8, 2)


def _shape(config: triton.Config, tile: str) -> tuple[int, int, int]:
    return config.kwargs[tile], config.num_warps, config.num_stages


def _words(args) -> int:
    """Registers an accumulator element takes: float32 FMA dots (no TF32) hold their
    operand tiles in registers too, so they count double."""
    return 2 if args["a_ptr"].dtype == torch.float32 and args["PRECISION"] == "ieee" else 1


def block_row_fits(config: triton.Config, args) -> bool:
    """Accumulator ``BM x b`` within 32 registers a thread (the indirectly addressed,
    pipelined loads need the rest); staged tiles in 160 KiB. The AOT check shows these
    bounds free of spills."""
    if args["a_ptr"].dtype == torch.float64:
        return _shape(config, "BM") == FLOAT64_BLOCK_ROW[args["B"]]
    acc_regs = config.kwargs["BM"] * args["B"] * _words(args) // (32 * config.num_warps)
    staged = config.num_stages * (config.kwargs["BM"] + args["B"]) * args["B"] * args["a_ptr"].dtype.itemsize
    return acc_regs <= 32 and staged <= 160 * 1024


def sampled_fits(config: triton.Config, args) -> bool:
    """``BN x b`` operand tiles within 32 (tensor cores) or 16 (FMA) elements a thread;
    staged tiles in 160 KiB."""
    if args["a_ptr"].dtype == torch.float64:
        return _shape(config, "BN") == FLOAT64_SAMPLED
    operand = config.kwargs["BN"] * args["B"] * _words(args) // (32 * config.num_warps)
    staged = config.num_stages * 2 * config.kwargs["BN"] * args["B"] * args["a_ptr"].dtype.itemsize
    return operand <= 32 and staged <= 160 * 1024


# The keys hold what the fits rules read (B, PRECISION; dtypes are triton's) and TRANS_V
# (forward and dx tune apart): a b=64 call must never reuse a b=16 winner.
@tuning.autotune(BLOCK_ROW_CONFIGS, key=["D_IN", "D_OUT", "DENSITY_KEY", "B", "TRANS_V", "PRECISION"],
                 fits=block_row_fits)
@triton.jit
def _block_row_kernel(
    a_ptr,  # (N, D_IN) activations: x (forward) or grad (dx)
    v_ptr,  # (nnzb, B, B) block values
    ptr_ptr,  # compressed offsets (D_OUT / B + 1): crow (forward) or ccol (dx)
    idx_ptr,  # block column of each block: col (forward) or row (dx)
    perm_ptr,  # value index of each block (dx); unused without HAS_PERM
    alpha_ptr,  # 0-d alpha
    branch_ptr,  # (N, D_OUT) residual; unused without HAS_BRANCH
    out_ptr,  # (N, D_OUT)
    N,
    D_IN,
    D_OUT,
    DENSITY_KEY,  # autotune key only: log2 of the blocks per output block
    B: tl.constexpr,
    BM: tl.constexpr,
    TRANS_V: tl.constexpr,  # multiply by V^T (forward) or V (dx)
    HAS_PERM: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    n_out_blocks = D_OUT // B
    pid = tl.program_id(0)
    out_block = pid % n_out_blocks
    first_row = (pid // n_out_blocks) * BM
    # 64-bit offsets only in the per-program base pointers; tile offsets stay 32-bit
    # (the launcher checks BM * D < 2**31), which halves the registers they hold.
    a_base = a_ptr + first_row.to(tl.int64) * D_IN
    out_offset = first_row.to(tl.int64) * D_OUT + out_block * B
    local = tl.arange(0, BM)
    lanes = tl.arange(0, B)
    row_ok = (first_row + local < N)[:, None]
    a_tile = local[:, None] * D_IN + lanes[None, :]
    if TRANS_V:
        v_tile = lanes[:, None] + lanes[None, :] * B  # [k, n] = V[n, k]
    else:
        v_tile = lanes[:, None] * B + lanes[None, :]
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BM, B), dtype=acc_dtype)
    for k in range(tl.load(ptr_ptr + out_block), tl.load(ptr_ptr + out_block + 1)):
        in_block = tl.load(idx_ptr + k).to(tl.int32)
        value = tl.load(perm_ptr + k) if HAS_PERM else k
        a = tl.load(a_base + in_block * B + a_tile, mask=row_ok, other=0.0)
        v = tl.load(v_ptr + value * (B * B) + v_tile)
        if UPCAST:
            a = a.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(a, v, acc, input_precision=PRECISION, out_dtype=acc_dtype)
    out = acc * tl.load(alpha_ptr).to(acc_dtype)
    out_tile = local[:, None] * D_OUT + lanes[None, :]
    if HAS_BRANCH:
        out += tl.load(branch_ptr + out_offset + out_tile, mask=row_ok).to(acc_dtype)
    tl.store(out_ptr + out_offset + out_tile, out.to(out_ptr.dtype.element_ty), mask=row_ok)


@tuning.autotune(SAMPLED_CONFIGS, key=["D_IN", "D_OUT", "DENSITY_KEY", "B", "PRECISION"], fits=sampled_fits)
@triton.jit
def _sampled_kernel(
    a_ptr,  # (N, D_OUT) grad
    x_ptr,  # (N, D_IN) input
    block_row_ptr,  # (nnzb,) block row of each block
    col_ptr,  # (nnzb,) block column of each block
    part_ptr,  # (SPLIT, nnzb, B, B) partial products, accumulation dtype
    N,
    D_IN,
    D_OUT,
    NNZB,
    SPLIT,
    DENSITY_KEY,
    B: tl.constexpr,
    BN: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    split = tl.program_id(1)
    row_block = tl.load(block_row_ptr + block)
    col_block = tl.load(col_ptr + block)
    chunk = tl.cdiv(tl.cdiv(N, SPLIT), BN) * BN
    lo = split * chunk
    hi = tl.minimum(lo + chunk, N)
    lanes = tl.arange(0, B)
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((B, B), dtype=acc_dtype)
    for start in range(lo, hi, BN):
        rows = (start + tl.arange(0, BN)).to(tl.int64)
        row_ok = (rows < hi)[:, None]
        g = tl.load(a_ptr + rows[:, None] * D_OUT + row_block * B + lanes[None, :], mask=row_ok, other=0.0)
        x = tl.load(x_ptr + rows[:, None] * D_IN + col_block * B + lanes[None, :], mask=row_ok, other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION, out_dtype=acc_dtype)
    offsets = (split.to(tl.int64) * NNZB + block) * (B * B) + lanes[:, None] * B + lanes[None, :]
    tl.store(part_ptr + offsets, acc)


def _density_key(nnzb: int, n_out_blocks: int) -> int:
    """log2 of the mean blocks per output block (the autotune key for density)."""
    return max(nnzb // max(n_out_blocks, 1), 1).bit_length()


def _block_row_product(a, values, ptr, idx, perm, alpha, branch, n_out: int, trans_v: bool) -> Tensor:
    """``alpha * (a @ M^T or M) + branch`` over a compressed layout (forward and dx)."""
    out = torch.empty(a.shape[0], n_out, dtype=a.dtype, device=a.device)
    if a.shape[0] == 0 or n_out == 0:
        return out
    b = values.shape[-1]
    n_out_blocks = n_out // b
    if max(BLOCK_ROW_CONFIGS, key=lambda c: c.kwargs["BM"]).kwargs["BM"] * max(a.shape[1], n_out) >= 2**31:
        raise ValueError(f"the Triton BSR kernel supports up to 2**23 features, got {max(a.shape[1], n_out)}")

    def grid(meta):
        return (triton.cdiv(a.shape[0], meta["BM"]) * n_out_blocks,)

    _block_row_kernel[grid](
        a,
        values,
        ptr,
        idx,
        idx if perm is None else perm,
        alpha,
        out if branch is None else branch,
        out,
        a.shape[0],
        a.shape[1],
        n_out,
        _density_key(values.shape[0], n_out_blocks),
        B=b,
        TRANS_V=trans_v,
        HAS_PERM=perm is not None,
        HAS_BRANCH=branch is not None,
        UPCAST=tuning.upcast(a.dtype),
        PRECISION=tuning.precision(a.dtype),
    )
    return out


@tuning.on_device_of_first_argument
def forward(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, alpha: Tensor, branch: Tensor | None) -> Tensor:
    """``y = alpha * (x @ M^T) + branch``: ``x (N, C*b)`` -> ``(N, R*b)``."""
    n_out = (crow.numel() - 1) * values.shape[-1]
    return _block_row_product(x, values, crow, col, None, alpha, branch, n_out, trans_v=True)


def _sampled_product(grad: Tensor, x: Tensor, values: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    """``S_k = grad[:, row(k)]^T @ x[:, col[k]]`` for every block: ``(nnzb, b, b)``, accumulation dtype."""
    nnzb, b = values.shape[0], values.shape[-1]
    acc = tuning.acc_dtype(x.dtype)
    n = x.shape[0]
    if nnzb == 0 or n == 0:
        return torch.zeros(nnzb, b, b, dtype=acc, device=x.device)
    n_rows = crow.numel() - 1
    block_row = torch.repeat_interleave(torch.arange(n_rows, device=crow.device), crow.diff(), output_size=nnzb)
    # Enough programs to fill the GPU about four times, at least 64 rows each.
    split = max(1, min(triton.cdiv(4 * tuning.sm_count(x.device), nnzb), triton.cdiv(n, 64)))
    partials = torch.empty(split, nnzb, b, b, dtype=acc, device=x.device)
    _sampled_kernel[(nnzb, split)](
        grad,
        x,
        block_row,
        col,
        partials,
        n,
        x.shape[1],
        grad.shape[1],
        nnzb,
        split,
        _density_key(nnzb, n_rows),
        B=b,
        UPCAST=tuning.upcast(x.dtype),
        PRECISION=tuning.precision(x.dtype),
    )
    return partials.sum(0)


@tuning.on_device_of_first_argument
def backward(grad, x, values, crow, col, ccol, row, perm, alpha, output_mask):
    """``(dx, dvalues, dalpha)``; an entry is ``None`` where ``output_mask`` is false."""
    need_x, need_values, need_alpha = output_mask
    dx = dvalues = dalpha = None
    if need_x:
        dx = _block_row_product(grad, values, ccol, row, perm, alpha, None, x.shape[1], trans_v=False)
    if need_values or need_alpha:
        s = _sampled_product(grad, x, values, crow, col)
        if need_values:
            dvalues = (alpha.to(s.dtype) * s).to(values.dtype)
        if need_alpha:
            dalpha = (s * values.to(s.dtype)).sum().to(alpha.dtype).reshape(alpha.shape)
    return dx, dvalues, dalpha
