"""Triton kernels of the block-sparse (BSR) skip-add family and their launchers.

    forward   y[:, i]  = alpha * sum_{k in row i} x[:, col[k]] @ V_k^T + branch[:, i]
    dx        dx[:, j] = alpha * sum_{t in col j} g[:, row[t]] @ V_{perm[t]}
    sampled   S_k      = g[:, row(k)]^T @ x[:, col[k]]            (b x b, M's blocks only)
              dV_k     = alpha * S_k,   dalpha = sum_k <S_k, V_k>

``[:, i]`` is the i-th group of ``b`` features. Forward and dx are one kernel
(:func:`_block_row_kernel`): a program owns ``BM`` positions of one output block column,
walks the blocks of its compressed row with ``tl.dot`` (fp32 accumulation, float64
for float64), applies alpha and the residual add in the epilogue and writes its tile
once. Programs are ordered output block first, so the programs running together read
the same positions of ``x`` and share them through L2. The sampled product
(:func:`_sampled_kernel`) splits the positions into ``SPLIT`` chunks, writes one partial
per (chunk, block) in the accumulation dtype and sums the partials in a fixed order:
deterministic, no atomics.

Two activation layouts, one kernel source: the kernels address activations through
(image, position, feature) strides (:func:`_geometry`).

- features-last ``x (N, C*b)``, ``branch``/``y (N, R*b)``: one image of N positions;
  the features are contiguous.
- features-first ``x (N, C*b, S)``, ``branch``/``y (N, R*b, S)`` (``NCHW`` viewed as
  ``(N, C, H*W)``): per image ``y[n] = alpha * M @ x[n] + branch[n]``. The positions
  (``S``) are contiguous: a tile is ``BM`` consecutive positions of one image, so its
  loads and stores are coalesced along ``S``, and the sampled product reduces over
  every (image, position).

``values (nnzb, b, b)``; layout as in :class:`entskip.BlockLayout`. All tensors
contiguous, on one device, layout validated (:func:`entskip.gpu_dispatch.check_bsr`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning
from .. import formats

BLOCK_ROW_CONFIGS = [
    triton.Config({"BM": bm}, num_warps=w, num_stages=s)
    for bm, w, s in [(64, 4, 3), (128, 4, 3), (128, 8, 4), (256, 8, 3), (64, 8, 2), (32, 8, 2)]
]
SAMPLED_CONFIGS = [
    triton.Config({"BN": bn}, num_warps=w, num_stages=s)
    for bn, w, s in [(64, 4, 3), (128, 4, 3), (256, 8, 3), (64, 8, 2), (32, 8, 2)]
]


# float64 is a correctness path (FMA dots): per block size, the config that compiles
# without spills on both supported triton releases (3.6 and 3.9; see the AOT check),
# in both activation layouts.
FLOAT64_BLOCK_ROW = {16: (64, 4, 3), 32: (64, 4, 3), 64: (64, 8, 2)}
FLOAT64_SAMPLED = (64, 8, 2)


def _shape(config: triton.Config, tile: str) -> tuple[int, int, int]:
    return config.kwargs[tile], config.num_warps, config.num_stages


def _words(args) -> int:
    """Registers an accumulator element takes: float32 FMA dots (no TF32) hold their
    operand tiles in registers too, so they count double, and features-first
    (``S_KEY > 0``) double again: their tiles step by S (of any alignment) between
    features, so every element holds its own address (the AOT check shows the
    features-last bound spilling there)."""
    if args["a_ptr"].dtype != torch.float32 or args["PRECISION"] != "ieee":
        return 1
    return 4 if args.get("S_KEY", 0) > 0 else 2  # the autotuner always passes S_KEY; absent: features-last


def block_row_fits(config: triton.Config, args) -> bool:
    """Accumulator ``BM x b`` within 32 registers a thread (the indirectly addressed,
    pipelined loads need the rest); staged tiles in 160 KiB; 32-row tiles only for
    float32 FMA dots, 256-row tiles only for 16-bit operands. The AOT check shows these
    bounds free of spills."""
    if args["a_ptr"].dtype == torch.float64:
        return _shape(config, "BM") == FLOAT64_BLOCK_ROW[args["B"]]
    if config.kwargs["BM"] < 64 and _words(args) == 1:  # tensor cores: wgmma multiplies 64-row tiles
        return False
    if config.kwargs["BM"] > 128 and args["a_ptr"].dtype.itemsize > 2:  # spills for TF32 b = 32 on sm_80 (triton 3.6)
        return False
    acc_regs = config.kwargs["BM"] * args["B"] * _words(args) // (32 * config.num_warps)
    staged = config.num_stages * (config.kwargs["BM"] + args["B"]) * args["B"] * args["a_ptr"].dtype.itemsize
    return acc_regs <= 32 and staged <= 160 * 1024


def sampled_fits(config: triton.Config, args) -> bool:
    """``BN x b`` operand tiles within 32 (tensor cores) or 16 (FMA) elements a thread;
    staged tiles in 160 KiB."""
    if args["a_ptr"].dtype == torch.float64:
        return _shape(config, "BN") == FLOAT64_SAMPLED
    if config.kwargs["BN"] < 64 and _words(args) == 1:  # the short tiles serve float32 FMA dots only
        return False
    operand = config.kwargs["BN"] * args["B"] * _words(args) // (32 * config.num_warps)
    staged = config.num_stages * 2 * config.kwargs["BN"] * args["B"] * args["a_ptr"].dtype.itemsize
    return operand <= 32 and staged <= 160 * 1024


# The keys hold what the fits rules read (B, PRECISION; dtypes are triton's) and TRANS_V
# (forward and dx tune apart): a b=64 call must never reuse a b=16 winner. S_KEY keeps the
# two activation layouts (and features-first maps of different sizes) apart.
@tuning.autotune(BLOCK_ROW_CONFIGS, key=["D_IN", "D_OUT", "DENSITY_KEY", "S_KEY", "B", "TRANS_V", "PRECISION"],
                 fits=block_row_fits)
@triton.jit
def _block_row_kernel(
    a_ptr,  # activations, D_IN features: x (forward) or grad (dx)
    v_ptr,  # (nnzb, B, B) block values
    ptr_ptr,  # compressed offsets (D_OUT / B + 1): crow (forward) or ccol (dx)
    idx_ptr,  # block column of each block: col (forward) or row (dx)
    perm_ptr,  # value index of each block (dx); unused without HAS_PERM
    alpha_ptr,  # 0-d alpha
    branch_ptr,  # residual, out's shape and strides; unused without HAS_BRANCH
    out_ptr,  # output, D_OUT features
    S,  # positions per image
    D_IN,  # autotune key only (the strides address the features)
    D_OUT,
    DENSITY_KEY,  # autotune key only: log2 of the blocks per output block
    S_KEY,  # autotune key only: 0 features-last, else S rounded up to a power of two
    stride_an,  # a: image, position and feature strides
    stride_as,
    stride_af,
    stride_on,  # out and branch: image, position and feature strides
    stride_os,
    stride_of,
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
    tile = pid // n_out_blocks
    s_tiles = tl.cdiv(S, BM)
    image = tile // s_tiles
    first = (tile - image * s_tiles) * BM
    # 64-bit offsets only in the per-program base pointers; tile offsets stay 32-bit
    # (the launcher checks that BM positions of all features fit in 2**31), which halves
    # the registers they hold.
    a_base = a_ptr + image.to(tl.int64) * stride_an + first.to(tl.int64) * stride_as
    out_offset = image.to(tl.int64) * stride_on + first.to(tl.int64) * stride_os + out_block * B * stride_of
    local = tl.arange(0, BM)
    lanes = tl.arange(0, B)
    pos_ok = (first + local < S)[:, None]
    a_tile = local[:, None] * stride_as + lanes[None, :] * stride_af
    if TRANS_V:
        v_tile = lanes[:, None] + lanes[None, :] * B  # [k, n] = V[n, k]
    else:
        v_tile = lanes[:, None] * B + lanes[None, :]
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BM, B), dtype=acc_dtype)
    for k in range(tl.load(ptr_ptr + out_block), tl.load(ptr_ptr + out_block + 1)):
        in_block = tl.load(idx_ptr + k).to(tl.int32)
        value = tl.load(perm_ptr + k) if HAS_PERM else k
        a = tl.load(a_base + in_block * B * stride_af + a_tile, mask=pos_ok, other=0.0)
        v = tl.load(v_ptr + value * (B * B) + v_tile)
        if UPCAST:
            a = a.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(a, v, acc, input_precision=PRECISION, out_dtype=acc_dtype)
    out = acc * tl.load(alpha_ptr).to(acc_dtype)
    out_tile = local[:, None] * stride_os + lanes[None, :] * stride_of
    if HAS_BRANCH:
        out += tl.load(branch_ptr + out_offset + out_tile, mask=pos_ok).to(acc_dtype)
    tl.store(out_ptr + out_offset + out_tile, out.to(out_ptr.dtype.element_ty), mask=pos_ok)


@tuning.autotune(SAMPLED_CONFIGS, key=["D_IN", "D_OUT", "DENSITY_KEY", "S_KEY", "B", "PRECISION"], fits=sampled_fits)
@triton.jit
def _sampled_kernel(
    a_ptr,  # grad, D_OUT features
    x_ptr,  # input, D_IN features
    block_row_ptr,  # (nnzb,) block row of each block
    col_ptr,  # (nnzb,) block column of each block
    part_ptr,  # (SPLIT, nnzb, B, B) partial products, accumulation dtype
    IMAGES,
    S,  # positions per image
    NNZB,
    SPLIT,
    D_IN,  # autotune keys only
    D_OUT,
    DENSITY_KEY,
    S_KEY,
    stride_an,  # grad: image, position and feature strides
    stride_as,
    stride_af,
    stride_xn,  # x: image, position and feature strides
    stride_xs,
    stride_xf,
    B: tl.constexpr,
    BN: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    split = tl.program_id(1)
    row_block = tl.load(block_row_ptr + block).to(tl.int32)
    col_block = tl.load(col_ptr + block).to(tl.int32)
    # The (image, BN positions) tiles in order, split into SPLIT runs of consecutive tiles.
    s_tiles = tl.cdiv(S, BN)
    run = tl.cdiv(IMAGES * s_tiles, SPLIT)
    lo = split * run
    hi = tl.minimum(lo + run, IMAGES * s_tiles)
    local = tl.arange(0, BN)
    lanes = tl.arange(0, B)
    g_tile = local[:, None] * stride_as + (row_block * B + lanes)[None, :] * stride_af
    x_tile = local[:, None] * stride_xs + (col_block * B + lanes)[None, :] * stride_xf
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((B, B), dtype=acc_dtype)
    for tile in range(lo, hi):
        image = tile // s_tiles
        first = (tile - image * s_tiles) * BN
        pos_ok = (first + local < S)[:, None]
        g_base = a_ptr + image.to(tl.int64) * stride_an + first.to(tl.int64) * stride_as
        x_base = x_ptr + image.to(tl.int64) * stride_xn + first.to(tl.int64) * stride_xs
        g = tl.load(g_base + g_tile, mask=pos_ok, other=0.0)
        x = tl.load(x_base + x_tile, mask=pos_ok, other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION, out_dtype=acc_dtype)
    offsets = (split.to(tl.int64) * NNZB + block) * (B * B) + lanes[:, None] * B + lanes[None, :]
    tl.store(part_ptr + offsets, acc)


def _density_key(nnzb: int, n_out_blocks: int) -> int:
    """log2 of the mean blocks per output block (the autotune key for density)."""
    return max(nnzb // max(n_out_blocks, 1), 1).bit_length()


def _geometry(t: Tensor) -> tuple[int, int, tuple[int, int, int]]:
    """``(images, positions per image, (image, position, feature) strides)`` of
    activations: features-last ``(rows, D)`` is one image of ``rows`` positions,
    features-first ``(N, D, S)`` is N images of S positions."""
    if t.dim() == 2:
        return 1, t.shape[0], (0, t.stride(0), t.stride(1))
    return t.shape[0], t.shape[2], (t.stride(0), t.stride(2), t.stride(1))


def _s_key(t: Tensor) -> int:
    """Autotune key of the layout: 0 features-last, else S rounded up to a power of two."""
    return 0 if t.dim() == 2 else triton.next_power_of_2(t.shape[2])


def _with_features(t: Tensor, features: int) -> Tensor:
    """An empty contiguous tensor of ``t``'s layout with ``features`` features."""
    return torch.empty(formats.with_features(t, features), dtype=t.dtype, device=t.device)


def _check_tile_offsets(t: Tensor, tile: int) -> None:
    """The kernels' 32-bit tile offsets reach ``tile`` positions of every feature."""
    _, _, (_, position, feature) = _geometry(t)
    if tile * position + t.shape[1] * feature >= 2**31:
        raise ValueError(f"the Triton BSR kernels need {tile} positions of all {t.shape[1]} features within "
                         f"2**31 elements, got shape {tuple(t.shape)}")


def _block_row_product(a, values, ptr, idx, perm, alpha, branch, n_out: int, trans_v: bool) -> Tensor:
    """``alpha * (M or M^T) a + branch`` per position over a compressed layout (forward and
    dx); ``a`` and the result in either layout (module docstring)."""
    out = _with_features(a, n_out)
    images, positions, a_strides = _geometry(a)
    if out.numel() == 0:
        return out
    b = values.shape[-1]
    n_out_blocks = n_out // b
    tile = max(c.kwargs["BM"] for c in BLOCK_ROW_CONFIGS)
    _check_tile_offsets(a, tile)
    _check_tile_offsets(out, tile)

    def grid(meta):
        return (images * triton.cdiv(positions, meta["BM"]) * n_out_blocks,)

    _block_row_kernel[grid](
        a,
        values,
        ptr,
        idx,
        idx if perm is None else perm,
        alpha,
        out if branch is None else branch,
        out,
        positions,
        a.shape[1],
        n_out,
        _density_key(values.shape[0], n_out_blocks),
        _s_key(a),
        *a_strides,
        *_geometry(out)[2],
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
    """``y = alpha * (x @ M^T) + branch``: ``x (N, C*b)`` -> ``(N, R*b)``, or features-first
    ``y[n] = alpha * M @ x[n] + branch[n]``: ``x (N, C*b, S)`` -> ``(N, R*b, S)``."""
    n_out = (crow.numel() - 1) * values.shape[-1]
    return _block_row_product(x, values, crow, col, None, alpha, branch, n_out, trans_v=True)


def _sampled_product(grad: Tensor, x: Tensor, values: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    """``S_k = sum over positions p of grad[p, row(k)]^T x[p, col[k]]`` (``b x b``) for every
    block, over every position of every image: ``(nnzb, b, b)``, accumulation dtype."""
    nnzb, b = values.shape[0], values.shape[-1]
    acc = tuning.acc_dtype(x.dtype)
    images, positions, x_strides = _geometry(x)
    if nnzb == 0 or images * positions == 0:
        return torch.zeros(nnzb, b, b, dtype=acc, device=x.device)
    tile = max(c.kwargs["BN"] for c in SAMPLED_CONFIGS)
    _check_tile_offsets(grad, tile)
    _check_tile_offsets(x, tile)
    n_rows = crow.numel() - 1
    block_row = torch.repeat_interleave(torch.arange(n_rows, device=crow.device), crow.diff(), output_size=nnzb)
    # Enough programs to fill the GPU about four times, at least 64 positions each.
    split = max(1, min(triton.cdiv(4 * tuning.sm_count(x.device), nnzb), triton.cdiv(images * positions, 64)))
    partials = torch.empty(split, nnzb, b, b, dtype=acc, device=x.device)
    _sampled_kernel[(nnzb, split)](
        grad,
        x,
        block_row,
        col,
        partials,
        images,
        positions,
        nnzb,
        split,
        x.shape[1],
        grad.shape[1],
        _density_key(nnzb, n_rows),
        _s_key(x),
        *_geometry(grad)[2],
        *x_strides,
        B=b,
        UPCAST=tuning.upcast(x.dtype),
        PRECISION=tuning.precision(x.dtype),
    )
    return partials.sum(0)


@tuning.on_device_of_first_argument
def backward(grad, x, values, crow, col, ccol, row, perm, alpha, output_mask):
    """``(dx, dvalues, dalpha)``; an entry is ``None`` where ``output_mask`` is false.
    ``grad`` and ``dx`` have ``x``'s layout: ``(N, R*b)``/``(N, C*b)`` or ``(N, R*b, S)``/``(N, C*b, S)``."""
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
