"""Shared plumbing of the Triton kernels: autotuning, dtypes and dot precision.

- :func:`autotune` wraps ``triton.autotune``. On a GPU it benchmarks every config that
  fits the call's dtype and block size; under the interpreter (``TRITON_INTERPRET=1``, CPU tests) it
  runs every such config once instead of timing it, so CI executes each shipped config.
- Kernels accumulate in float32 (float64 for float64 inputs). bfloat16 arithmetic is
  wrong in the triton interpreter (docs/gpu.md), so the launchers ask kernels to
  upcast tiles right after loading them there (``UPCAST``); on a GPU tiles stay in
  their dtype and ``tl.dot`` runs on the tensor cores.
- float32 products use TF32 only when ``torch.backends.cuda.matmul.allow_tf32`` allows it.
"""

from __future__ import annotations

import functools

import torch
import triton

_TRITON_DTYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False


def _run_once(kernel_call, quantiles):
    kernel_call()
    return [1.0 for _ in quantiles]


def autotune(configs: list[triton.Config], key: list[str], fits, reset_to_zero: list[str] | None = None):
    """``triton.autotune`` over the ``configs`` for which ``fits(config, named_args)`` holds.

    ``fits`` keeps a kernel's register and shared-memory use within the budget that
    keeps it free of spills for the dtype and block size of the call; the AOT check
    (``python -m entskip.triton_kernels.aot``) compiles exactly the configs it keeps.
    ``reset_to_zero`` names outputs that a kernel accumulates into: zeroed before each
    timed config and again before the chosen one runs.
    """

    def prune(configs, named_args, **kwargs):
        kept = [c for c in configs if fits(c, {**named_args, **kwargs})]
        if not kept:
            raise ValueError(f"no Triton config fits these arguments: {sorted(kwargs)}")
        return kept

    return triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by={"early_config_prune": prune},
        reset_to_zero=reset_to_zero,
        do_bench=_run_once if interpreting() else None,
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
