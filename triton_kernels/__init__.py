"""Triton kernels of entskip, installed as ``entskip.triton_kernels``.

- :mod:`.bsr_skip`: block-sparse skip-add, forward, dx and the sampled dvalues product.
- :mod:`.dense_skip`: dense skip-add (one matmul kernel with a fused epilogue).
- :mod:`.elementwise_skip`: identity and permutation skip-adds (one-pass elementwise kernels).
- :mod:`.tuning`: autotuning (also under ``TRITON_INTERPRET=1``), dtypes, precision.
- :mod:`.aot`: ahead-of-time compilation of every shipped config for sm_80 and sm_90
  with a register / spill / shared-memory report (``python -m entskip.triton_kernels.aot``).

The launchers take contiguous, checked tensors; the entskip ops call them through
:mod:`entskip.gpu_dispatch`, which checks arguments and layouts first.
"""

from . import bsr_skip, dense_skip, elementwise_skip, tuning

__all__ = ["bsr_skip", "dense_skip", "elementwise_skip", "tuning"]
