"""Shared plumbing of the Triton kernels: autotuning, dtypes, dot precision, device.

- :func:`autotune` wraps ``triton.autotune`` over the configs that fit the call's dtype,
  block size and precision. The key of every tuned kernel holds each argument its ``fits``
  rule reads (besides the tensors' dtypes, which triton adds), so pruning runs again for
  every combination that changes what fits. ``ENTSKIP_AUTOTUNE`` chooses what tuning does:

  ``bench``  (default on a GPU) time every config that fits and keep the fastest;
  ``once``   (default under ``TRITON_INTERPRET=1``) run every config that fits once,
             untimed, and keep the first: each config compiles and launches, nothing is
             timed (GPU test runs; CPU CI executes every shipped config this way);
  ``first``  run only the first config that fits: one compile per key, no tuning (the
             quickest GPU correctness runs).

  Under ``once`` and ``first`` the results come from the first config that fits. Unset or
  empty means the default; any other value raises ``ValueError`` at the first launch, and
  ``bench`` does too under the interpreter (it cannot time kernels). The mode is read
  when a key is tuned: a key tuned before a change keeps its config.
- Kernels accumulate in float32 (float64 for float64 inputs). bfloat16 arithmetic is
  wrong in the triton interpreter (docs/gpu.md), so the launchers ask kernels to
  upcast tiles right after loading them there (``UPCAST``); on a GPU tiles stay in
  their dtype and ``tl.dot`` runs on the tensor cores.
- float32 products use TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` allows it.
- Triton launches on the current CUDA device: :func:`on_device_of_first_argument` makes
  the launchers run on their tensors' device (a no-op for the interpreter's CPU tensors).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

_TRITON_DTYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
AUTOTUNE_MODES = ("bench", "once", "first")


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False


def autotune_mode() -> str:
    """``"bench"``, ``"once"`` or ``"first"`` from ``ENTSKIP_AUTOTUNE`` (module docstring)."""
    mode = os.environ.get("ENTSKIP_AUTOTUNE", "") or ("once" if interpreting() else "bench")
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"ENTSKIP_AUTOTUNE must be one of {', '.join(AUTOTUNE_MODES)} or unset, got {mode!r}")
    return mode


def _benchmark(kernel_call, quantiles):
    """Times ``kernel_call`` with triton's benchmarker for the active GPU."""
    if interpreting():
        raise ValueError("ENTSKIP_AUTOTUNE=bench times kernels on a GPU; under TRITON_INTERPRET=1 use once or first")
    from triton.runtime.driver import driver

    return driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)


def _do_bench(kernel_call, quantiles):
    """The autotuner's benchmark step: timed under ``bench``, else one untimed run."""
    if autotune_mode() == "bench":
        return _benchmark(kernel_call, quantiles)
    kernel_call()
    return [1.0 for _ in quantiles]


def autotune(configs: list[triton.Config], key: list[str], fits, reset_to_zero: list[str] | None = None):
    """``triton.autotune`` over the ``configs`` for which ``fits(config, named_args)`` holds
    (only the first of them under ``ENTSKIP_AUTOTUNE=first``).

    ``key`` must name every argument that ``fits`` reads, except the tensors (their dtypes
    are part of triton's key): pruning runs once per key. ``fits`` keeps a kernel's
    register and shared-memory use within the budget that keeps it free of spills for the
    dtype and block size of the call; the AOT check (``python -m entskip.triton_kernels.aot``)
    compiles exactly the configs it keeps. ``reset_to_zero`` names outputs that a kernel
    accumulates into: zeroed before each timed config and again before the chosen one runs.
    """

    def prune(configs, named_args, **kwargs):
        kept = [c for c in configs if fits(c, {**named_args, **kwargs})]
        if not kept:
            raise ValueError(f"no Triton config fits these arguments: {sorted(kwargs)}")
        return kept[:1] if autotune_mode() == "first" else kept

    return triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by={"early_config_prune": prune},
        reset_to_zero=reset_to_zero,
        do_bench=_do_bench,
    )


def triton_dtype(dtype: torch.dtype) -> str:
    """Triton's name of a torch floating dtype (``"bf16"`` ...) for AOT signatures."""
    try:
        return _TRITON_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"the Triton kernels support {tuple(_TRITON_DTYPES)}, got {dtype}") from None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(dtype: torch.dtype) -> bool:
    """Whether kernels must convert loaded tiles to float32 before arithmetic."""
    return dtype == torch.bfloat16 and interpreting()


def precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: ``"tf32"`` for float32 when torch allows TF32, else ``"ieee"``."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the interpreter on the CPU)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def device_guard(tensor: torch.Tensor):
    """``torch.cuda.device(tensor.device)`` for a CUDA tensor (Triton launches on the current
    device, not the tensors'); a no-op context for the interpreter's CPU tensors."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def on_device_of_first_argument(launcher):
    """Decorates a launcher to run under :func:`device_guard` of its first argument."""

    @functools.wraps(launcher)
    def guarded(first, *args, **kwargs):
        with device_guard(first):
            return launcher(first, *args, **kwargs)

    return guarded
