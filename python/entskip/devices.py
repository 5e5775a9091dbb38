"""Device agreement of an op's tensor arguments.

Every tensor an entskip op reads must be on ``x``'s device. A tensor elsewhere is an
error, never moved: a silent host-to-device copy would block (and break CUDA graph
capture), and a ``meta`` tensor among real ones would make the dispatcher run the op's
fake kernel, whose output is uninitialised memory.
"""

from __future__ import annotations

from torch import Tensor


def check_same(x: Tensor, **tensors: Tensor | None) -> None:
    """Raise ``ValueError`` naming the first of ``tensors`` (``None`` skipped) that is not
    on ``x``'s device, with both devices."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; every tensor argument must be on x's device")
