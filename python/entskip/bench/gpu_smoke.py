"""A first look at both GPU backends: one forward and backward each, against the reference, timed.

``python3 -m entskip.bench.gpu_smoke`` runs ``bsr_skip_add`` (block ``b``, density 1/8) and
``dense_skip_add`` on ``N x D`` inputs with each backend (``triton``, ``cuda``), checks
``y = alpha * x @ M^T + r`` and its gradients ``(dx, dM, dalpha)`` against the float64
reference (autograd of ``entskip.reference``), and prints one line per case with the median
forward and forward+backward times beside ``x + r`` (CUDA events). Step (A) of
bench/gpu_check.sh. Exit status 1 when a case fails or, on a GPU, a backend is missing.

Without a GPU (``--device cpu``, a dry run) the shapes are small, Triton runs in its
interpreter (``TRITON_INTERPRET=1``), and the ``cuda`` backend is reported as not run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from entskip import bsr_skip, dense_skip, gpu_dispatch, reference
from entskip.layout import BlockLayout

# Relative tolerances (scaled by the reference's largest magnitude; dM by sqrt(N) more).
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _timer(device: torch.device, fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after one warm-up (CUDA events on a GPU)."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _problem(kind: str, n: int, d: int, block: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Inputs ``(x, matrix operand, branch, grad, alpha)`` and the forward/backward of ``kind`` per backend."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)

    x, branch, grad = rand(n, d), rand(n, d), rand(n, d)
    alpha = torch.tensor(0.7, device=device)
    if kind == "dense":
        weight = rand(d, d, scale=d**-0.5)
        return (x, weight, branch, grad, alpha, reference.skip_add,
                lambda be: dense_skip.gpu_forward(x, weight, alpha, branch, be),
                lambda be: dense_skip.gpu_backward(grad, x, weight, alpha, [True, True, True], be))
    mask = torch.rand(d // block, d // block, generator=gen) < 1 / 8
    mask[:, 0] = True  # no empty block row
    layout = BlockLayout.from_mask(mask, block).to(device)
    values, tensors = rand(layout.nnzb, block, block, scale=block**-0.5), layout.tensors()
    crow, col = layout.crow_indices, layout.col_indices
    return (x, values, branch, grad, alpha,
            lambda x_, v_, r_, a_: reference.bsr_skip_add(x_, v_, crow, col, r_, a_),
            lambda be: bsr_skip.gpu_forward(x, values, *tensors, alpha, branch, be),
            lambda be: bsr_skip.gpu_backward(grad, x, values, *tensors, alpha, [True, True, True], be))


def _errors(actual, expected, scales) -> float:
    """The largest ``|actual - expected| / scale`` over the outputs (relative to each output's size)."""
    worst = 0.0
    for a, e, s in zip(actual, expected, scales):
        e = e.double()
        bound = max(e.abs().max().item(), 1.0) * s
        worst = max(worst, (a.double() - e).abs().max().item() / bound)
    return worst


def check(kind: str, backend: str, n: int, d: int, block: int, dtype: torch.dtype, device: torch.device,
          repeats: int) -> dict:
    """One case: correctness against the float64 reference and the median times."""
    x, matrix, branch, grad, alpha, ref, forward, backward = _problem(kind, n, d, block, dtype, device)
    leaves = [t.detach().double().requires_grad_(True) for t in (x, matrix, alpha)]
    y_ref = ref(leaves[0], leaves[1], branch.double(), leaves[2])
    grads_ref = torch.autograd.grad(y_ref, leaves, grad.double())
    y, grads = forward(backend), backward(backend)
    err = _errors([y, *grads], [y_ref, *grads_ref], [1.0, 1.0, 4 * n**0.5, 4 * n**0.5])
    row = {"kind": kind, "backend": backend, "dtype": str(dtype).removeprefix("torch."), "n": n, "d": d,
           "error": err, "pass": bool(err <= RTOL[dtype])}
    row["forward_ms"] = _timer(device, lambda: forward(backend), repeats)
    row["forward_backward_ms"] = _timer(device, lambda: (forward(backend), backward(backend)), repeats)
    row["x_plus_r_ms"] = _timer(device, lambda: x + branch, repeats)
    return row


def _available(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend == "triton" and not gpu_dispatch.triton_available():
        return "triton is not installed"
    if backend == "cuda" and device.type != "cuda":
        return "the CUDA C++ kernels need a GPU"
    if backend == "cuda" and not gpu_dispatch.cuda_kernels_available():
        return "entskip._C was built without its CUDA kernels"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m entskip.bench.gpu_smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, help="rows (default: 16384 on CUDA, 64 on CPU)")
    p.add_argument("--d", type=int, help="features (default: 4096 on CUDA, 128 on CPU)")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--repeats", type=int, help="timed calls (default: 20 on CUDA, 1 on CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    n, d = args.n or (16384 if on_gpu else 64), args.d or (4096 if on_gpu else 128)
    repeats = args.repeats or (20 if on_gpu else 1)
    dtypes = [torch.bfloat16, torch.float32] if on_gpu else [torch.float32]
    failed = False
    print(f"{'case':34} {'error/tol':>9} {'fwd ms':>8} {'fwd+bwd':>8} {'x+r ms':>8}")
    for backend in ("triton", "cuda"):
        reason = _available(backend, device)
        for kind in ("sparse", "dense"):
            for dtype in dtypes:
                name = f"{kind} {backend} {str(dtype)[6:]} N={n} D={d}"
                if reason:
                    failed |= on_gpu
                    print(f"{name:34} not run: {reason}")
                    continue
                try:
                    r = check(kind, backend, n, d, args.block, dtype, device, repeats)
                except Exception as err:  # noqa: BLE001 - reported, and the exit status says it failed
                    failed = True
                    print(f"{name:34} FAILED: {type(err).__name__}: {err}")
                    continue
                failed |= not r["pass"]
                verdict = "" if r["pass"] else "  FAILED (error above tolerance)"
                print(f"{name:34} {r['error'] / RTOL[dtype]:9.3f} {r['forward_ms']:8.3f} "
                      f"{r['forward_backward_ms']:8.3f} {r['x_plus_r_ms']:8.3f}{verdict}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
