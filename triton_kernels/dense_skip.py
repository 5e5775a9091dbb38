"""Triton kernel of the dense skip-add family and its launchers.

    forward   y  = alpha * (x @ W^T) + branch          x (N, D_in), W (D_out, D_in)
    dx        dx = alpha * (g @ W)
    dW        S  = g^T @ x,  dW = alpha * S,  dalpha = <S, W>

Features-first activations ``x (N, D_in, S)`` (``NCHW`` viewed as ``(N, C, H*W)``):

    forward   y[n] = alpha * W @ x[n] + branch[n]      -> (N, D_out, S)
    dx        dx[n] = alpha * W^T @ g[n]
    dW        S  = sum_n g[n] @ x[n]^T,  dW = alpha * S,  dalpha = <S, W>

One tiled matmul kernel (:func:`_matmul_kernel`) serves all six through strides, over a
batch of ``L`` products: ``C[l] (M, N) = alpha * (A[l] (M, K) @ B[l] (K, N)) + branch[l]``
(one batch entry per program column), or with ``REDUCE_L`` the sum over the batch,
``C (M, N) = alpha * sum_l A[l] @ B[l]`` (features-first dW sums over the images). Programs
are grouped along M for L2 reuse, fp32 accumulation (float64 for float64), the epilogue
applying alpha and the residual add so ``y`` is written once. Features-first products are
arranged so that ``C`` is row-major with the positions ``S`` as its columns (forward and
dx: ``A = W`` or ``W^T``, ``B = x[n]`` or ``g[n]``): loads of ``B`` and stores of ``C`` are
coalesced along ``S``. For dW it also reduces ``<S tile, W tile>`` into one partial per
program, so dalpha costs no extra pass over ``S``; the partials are summed in a fixed order
(deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning

def _configs(shapes):
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


# Tensor-core tiles (bfloat16, float16, TF32) and FMA tiles (float32 without TF32, float64).
TENSOR_CORE_CONFIGS = _configs([(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                                (64, 64, 64, 4, 3)])
FMA_CONFIGS = _configs([(32, 64, 32, 4, 3), (64, 64, 32, 8, 3), (64, 64, 32, 8, 4)])
# Features-first operands step by S (of any alignment) between rows: their loads are scalar,
# each element holding its own address, so they get smaller tiles (the AOT check shows the
# features-last tiles spilling there).
FF_TENSOR_CORE_CONFIGS = _configs([(64, 64, 32, 4, 3), (64, 64, 32, 4, 2)])
FF_FMA_CONFIGS = _configs([(32, 64, 32, 4, 2), (32, 32, 32, 4, 2), (64, 32, 32, 4, 2)])
MATMUL_CONFIGS = TENSOR_CORE_CONFIGS + FMA_CONFIGS + FF_TENSOR_CORE_CONFIGS + FF_FMA_CONFIGS


def uses_fma(args) -> bool:
    """Whether ``tl.dot`` runs on FMA units: float64, and float32 without TF32."""
    dtype = args["a_ptr"].dtype
    return dtype == torch.float64 or (dtype == torch.float32 and args["PRECISION"] == "ieee")


def matmul_fits(config: triton.Config, args) -> bool:
    """FMA configs for FMA dots; tensor-core configs with the accumulator within 128 fp32
    registers a thread (64 for dW, whose transposed operand needs more) and staged tiles
    in 160 KiB (the AOT check shows these bounds free of spills). Features-first calls
    (``L_KEY > 0``) choose from their own sets."""
    features_first = args.get("L_KEY", 0) > 0  # the autotuner always passes L_KEY; absent: features-last
    if uses_fma(args):
        if not features_first:
            return config in FMA_CONFIGS
        # the float64 features-first dW build of the 32 x 64 tile spills on sm_90 (triton 3.6)
        wide_f64_dw = args["HAS_DOT"] and args["a_ptr"].dtype == torch.float64 and config.kwargs["BN"] > 32
        return config in FF_FMA_CONFIGS and not wide_f64_dw
    kw = config.kwargs
    acc_regs = kw["BM"] * kw["BN"] // (32 * config.num_warps)
    staged = config.num_stages * (kw["BM"] + kw["BN"]) * kw["BK"] * args["a_ptr"].dtype.itemsize
    tiles = FF_TENSOR_CORE_CONFIGS if features_first else TENSOR_CORE_CONFIGS
    return config in tiles and acc_regs <= (64 if args["HAS_DOT"] else 128) and staged <= 160 * 1024


# Row counts are bucketed (M_KEY, K_KEY, L_KEY: next power of two), so a new batch size reuses
# a tuned config; HAS_DOT, L_KEY (the layout) and PRECISION change which configs fit.
@tuning.autotune(MATMUL_CONFIGS, key=["M_KEY", "N", "K_KEY", "L_KEY", "HAS_DOT", "REDUCE_L", "PRECISION"],
                 fits=matmul_fits)
@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    alpha_ptr,
    branch_ptr,  # C's shape, contiguous; unused without HAS_BRANCH
    c_ptr,  # (L, M, N) contiguous output ((M, N) with REDUCE_L)
    dot_ptr,  # (M, N) row-major matrix for <acc, dot> partials; unused without HAS_DOT
    part_ptr,  # (programs,) partials of <acc, dot>
    M,
    N,
    K,
    L,  # batch entries (summed with REDUCE_L)
    M_KEY,  # autotune key only: M rounded to a power of two
    K_KEY,  # autotune key only: K rounded to a power of two
    L_KEY,  # autotune key only: 0 features-last, else L (images) rounded to a power of two
    stride_al,
    stride_am,
    stride_ak,
    stride_bl,
    stride_bk,
    stride_bn,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    HAS_DOT: tl.constexpr,
    REDUCE_L: tl.constexpr,  # sum the batch into one C (grid of one column)
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_l = tl.program_id(1)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    group = GROUP_M * grid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    offs_m = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    offs_n = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    a_tile = (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_tile = offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn
    # pid_l is 0 with REDUCE_L (one program column), which then walks all L batch entries
    a_batch = a_ptr + pid_l.to(tl.int64) * stride_al + a_tile
    b_batch = b_ptr + pid_l.to(tl.int64) * stride_bl + b_tile
    if REDUCE_L:
        batches = L
    else:
        batches = 1
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BM, BN), dtype=acc_dtype)
    for _ in range(batches):
        a_ptrs = a_batch
        b_ptrs = b_batch
        for k in range(0, tl.cdiv(K, BK)):
            k_ok = offs_k < K - k * BK
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc_dtype)
            a_ptrs += BK * stride_ak
            b_ptrs += BK * stride_bk
        a_batch += stride_al
        b_batch += stride_bl
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offsets = offs_m[:, None] * N + offs_n[None, :]
    if HAS_DOT:
        dot = tl.load(dot_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
        tl.store(part_ptr + pid, tl.sum(tl.sum(acc * dot, axis=1), axis=0))
    out = acc * tl.load(alpha_ptr).to(acc_dtype)
    offsets += pid_l.to(tl.int64) * M * N
    if HAS_BRANCH:
        out += tl.load(branch_ptr + offsets, mask=mask).to(acc_dtype)
    tl.store(c_ptr + offsets, out.to(c_ptr.dtype.element_ty), mask=mask)


MAX_IMAGES = 65535  # CUDA's limit on a grid's second axis, one image per index


def _matmul(a: Tensor, b: Tensor, alpha: Tensor, features_first: bool, branch: Tensor | None = None,
            dot: Tensor | None = None, reduce: bool = False):
    """``(alpha * (a[l] @ b[l]) + branch[l], None)`` for strided batches ``a (L, M, K)``,
    ``b (L, K, N)`` -> ``(L, M, N)``; with ``reduce``, ``(alpha * sum_l a[l] @ b[l], <sum_l
    a[l] @ b[l], dot>)`` -> ``(1, M, N)`` and a 0-d inner product in the accumulation dtype
    (``None`` without ``dot``, which needs ``reduce``). ``features_first`` chooses the
    configs (:func:`matmul_fits`)."""
    (batch, m, k), n = a.shape, b.shape[2]
    if not reduce and batch > MAX_IMAGES:  # grid axis 1 holds the images: launch in slices
        return torch.cat([
            _matmul(a[i:i + MAX_IMAGES], b[i:i + MAX_IMAGES], alpha, features_first,
                    None if branch is None else branch[i:i + MAX_IMAGES])[0]
            for i in range(0, batch, MAX_IMAGES)
        ]), None
    out = torch.empty(1 if reduce else batch, m, n, dtype=a.dtype, device=a.device)
    acc = tuning.acc_dtype(a.dtype)
    zero = None if dot is None else torch.zeros((), dtype=acc, device=a.device)
    if out.numel() == 0:
        return out, zero
    if k == 0 or batch == 0:  # an empty product: the GEMM is zero
        out.copy_(branch if branch is not None else torch.zeros_like(out))
        return out, zero

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]), out.shape[0])

    # One partial per program of the largest grid; the sum reads those of the config that ran.
    max_programs = max(grid(c.kwargs)[0] for c in MATMUL_CONFIGS) if dot is not None else 1
    partials = torch.empty(max_programs, dtype=acc, device=a.device)

    _matmul_kernel[grid](
        a,
        b,
        alpha,
        out if branch is None else branch,
        out,
        out if dot is None else dot,
        partials,
        m,
        n,
        k,
        batch,
        triton.next_power_of_2(m),
        triton.next_power_of_2(k),
        triton.next_power_of_2(batch) if features_first else 0,
        *a.stride(),
        *b.stride(),
        HAS_BRANCH=branch is not None,
        HAS_DOT=dot is not None,
        REDUCE_L=reduce,
        UPCAST=tuning.upcast(a.dtype),
        PRECISION=tuning.precision(a.dtype),
    )
    if dot is None:
        return out, None
    return out, partials[: grid(_matmul_kernel.best_config.kwargs)[0]].sum()


@tuning.on_device_of_first_argument
def forward(x: Tensor, weight: Tensor, alpha: Tensor, branch: Tensor | None) -> Tensor:
    """``y = alpha * (x @ W^T) + branch``: ``x (N, D_in)``, ``W (D_out, D_in)`` -> ``(N, D_out)``;
    features-first ``y[n] = alpha * W @ x[n] + branch[n]``: ``x (N, D_in, S)`` -> ``(N, D_out, S)``."""
    if x.dim() == 3:
        return _matmul(weight.expand(x.shape[0], -1, -1), x, alpha, True, branch)[0]
    return _matmul(x[None], weight.t()[None], alpha, False, None if branch is None else branch[None])[0][0]


@tuning.on_device_of_first_argument
def backward(grad: Tensor, x: Tensor, weight: Tensor, alpha: Tensor, output_mask):
    """``(dx, dW, dalpha)``; an entry is ``None`` where ``output_mask`` is false. ``grad`` and
    ``dx`` have ``x``'s layout: ``(N, D_out)``/``(N, D_in)`` or ``(N, D_out, S)``/``(N, D_in, S)``."""
    need_x, need_w, need_alpha = output_mask
    dx = dw = dalpha = None
    features_first = x.dim() == 3
    if features_first:  # dx[n] = alpha * W^T @ g[n];  S = sum_n g[n] @ x[n]^T
        dx_operands = (weight.t().expand(x.shape[0], -1, -1), grad)
        s_operands = (grad, x.transpose(1, 2))
    else:  # dx = alpha * g @ W;  S = g^T @ x
        dx_operands = (grad[None], weight[None])
        s_operands = (grad.t()[None], x[None])
    if need_x:
        dx = _matmul(*dx_operands, alpha, features_first)[0].reshape(x.shape)
    if need_w or need_alpha:
        dw, s_dot_w = _matmul(*s_operands, alpha, features_first, dot=weight, reduce=True)
        dw = dw[0] if need_w else None
        dalpha = s_dot_w.to(alpha.dtype).reshape(alpha.shape) if need_alpha else None
    return dx, dw, dalpha
