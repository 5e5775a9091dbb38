"""Triton kernel of the dense skip-add family and its launchers.

    forward   y  = alpha * (x @ W^T) + branch          x (N, D_in), W (D_out, D_in)
    dx        dx = alpha * (g @ W)
    dW        S  = g^T @ x,  dW = alpha * S,  dalpha = <S, W>

One tiled matmul kernel (:func:`_matmul_kernel`) serves all three through strides:
``C (M, N) = scale * (A (M, K) @ B (K, N)) + branch``, programs grouped along M for L2
reuse, fp32 accumulation (float64 for float64), the epilogue applying alpha and the
residual add so ``y`` is written once. For dW it also reduces ``<S tile, W tile>`` into
one partial per program, so dalpha costs no extra pass over ``S``; the partials are
summed in a fixed order (deterministic).
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
MATMUL_CONFIGS = TENSOR_CORE_CONFIGS + FMA_CONFIGS


def uses_fma(args) -> bool:
    """Whether ``tl.dot`` runs on FMA units: float64, and float32 without TF32."""
    dtype = args["a_ptr"].dtype
    return dtype == torch.float64 or (dtype == torch.float32 and args["PRECISION"] == "ieee")


def matmul_fits(config: triton.Config, args) -> bool:
    """FMA configs for FMA dots; tensor-core configs with the accumulator within 128 fp32
    registers a thread (64 for dW, whose transposed operand needs more) and staged tiles
    in 160 KiB (the AOT check shows these bounds free of spills)."""
    if uses_fma(args):
        return config in FMA_CONFIGS
    kw = config.kwargs
    acc_regs = kw["BM"] * kw["BN"] // (32 * config.num_warps)
    staged = config.num_stages * (kw["BM"] + kw["BN"]) * kw["BK"] * args["a_ptr"].dtype.itemsize
    return config in TENSOR_CORE_CONFIGS and acc_regs <= (64 if args["HAS_DOT"] else 128) and staged <= 160 * 1024


# Row counts are bucketed (M_KEY, K_KEY: next power of two), so a new batch size reuses a
# tuned config; HAS_DOT and PRECISION change which configs fit.
@tuning.autotune(MATMUL_CONFIGS, key=["M_KEY", "N", "K_KEY", "HAS_DOT", "PRECISION"], fits=matmul_fits)
@triton.jit
def _matmul_kernel(
    a_ptr,
    b_ptr,
    alpha_ptr,
    branch_ptr,  # (M, N) residual; unused without HAS_BRANCH
    c_ptr,  # (M, N) row-major output
    dot_ptr,  # (M, N) row-major matrix for <acc, dot> partials; unused without HAS_DOT
    part_ptr,  # (programs,) partials of <acc, dot>
    M,
    N,
    K,
    M_KEY,  # autotune key only: M rounded to a power of two
    K_KEY,  # autotune key only: K rounded to a power of two
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BRANCH: tl.constexpr,
    HAS_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
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
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn
    acc_dtype = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BM, BN), dtype=acc_dtype)
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
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offsets = offs_m[:, None] * N + offs_n[None, :]
    if HAS_DOT:
        dot = tl.load(dot_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
        tl.store(part_ptr + pid, tl.sum(tl.sum(acc * dot, axis=1), axis=0))
    out = acc * tl.load(alpha_ptr).to(acc_dtype)
    if HAS_BRANCH:
        out += tl.load(branch_ptr + offsets, mask=mask).to(acc_dtype)
    tl.store(c_ptr + offsets, out.to(c_ptr.dtype.element_ty), mask=mask)


def _matmul(a: Tensor, b: Tensor, alpha: Tensor, branch: Tensor | None = None, dot: Tensor | None = None):
    """``(alpha * (a @ b) + branch, <a @ b, dot>)`` for strided ``a (M, K)``, ``b (K, N)``;
    the second is ``None`` without ``dot``, else 0-d in the accumulation dtype."""
    (m, k), n = a.shape, b.shape[1]
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    acc = tuning.acc_dtype(a.dtype)
    zero = None if dot is None else torch.zeros((), dtype=acc, device=a.device)
    if m == 0 or n == 0:
        return out, zero
    if k == 0:  # an empty product: the GEMM is zero
        out.copy_(branch if branch is not None else torch.zeros_like(out))
        return out, zero

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

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
        triton.next_power_of_2(m),
        triton.next_power_of_2(k),
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        HAS_BRANCH=branch is not None,
        HAS_DOT=dot is not None,
        UPCAST=tuning.upcast(a.dtype),
        PRECISION=tuning.precision(a.dtype),
    )
    if dot is None:
        return out, None
    return out, partials[: grid(_matmul_kernel.best_config.kwargs)[0]].sum()


@tuning.on_device_of_first_argument
def forward(x: Tensor, weight: Tensor, alpha: Tensor, branch: Tensor | None) -> Tensor:
    """``y = alpha * (x @ W^T) + branch``: ``x (N, D_in)``, ``W (D_out, D_in)`` -> ``(N, D_out)``."""
    return _matmul(x, weight.t(), alpha, branch)[0]


@tuning.on_device_of_first_argument
def backward(grad: Tensor, x: Tensor, weight: Tensor, alpha: Tensor, output_mask):
    """``(dx, dW, dalpha)``; an entry is ``None`` where ``output_mask`` is false."""
    need_x, need_w, need_alpha = output_mask
    dx = dw = dalpha = None
    if need_x:
        dx = _matmul(grad, weight, alpha)[0]
    if need_w or need_alpha:
        dw, s_dot_w = _matmul(grad.t(), x, alpha, dot=weight)
        dw = dw if need_w else None
        dalpha = s_dot_w.to(alpha.dtype).reshape(alpha.shape) if need_alpha else None
    return dx, dw, dalpha
