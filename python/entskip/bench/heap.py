"""The benchmark process's heap: freed memory stays in it (glibc's malloc).

PyTorch's CPU tensors come from ``malloc``. glibc serves a large request (its threshold
adapts, from 128 KiB up) with a fresh ``mmap`` and gives it back on ``free``, and trims
the top of the heap once enough is free there, so that a timed call's output of a few MiB
is, often but not always, memory the kernel has never mapped: each of its pages then
faults on the first write. On a 2-vCPU VM that made the calls of a 16 x 197 x 192 float32
skip (x + r and torch.add included) fall into two groups, about 0.1 ms and about 0.65 ms,
and the medians of 30 calls swung with the mix. The benchmark sets glibc's mmap and trim
thresholds to 1 GiB (``mallopt``) before it allocates, so that freed memory is reused
and the times are the kernels'; a training loop's allocator (PyTorch's caching one on a
GPU, or one that reuses memory on the CPU) sees the same. Recorded in every JSON (``malloc``).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
THRESHOLD = 1 << 30

SETTINGS: dict | None = None  # what keep_freed_memory set, for the JSON


def keep_freed_memory() -> dict | None:
    """Set glibc's mmap and trim thresholds to :data:`THRESHOLD` bytes for the rest of the
    process; returns (and keeps in :data:`SETTINGS`) what was set, or ``None`` where the C
    library has no ``mallopt`` (not glibc) or refused."""
    global SETTINGS
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return None
    if mallopt(_M_MMAP_THRESHOLD, THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, THRESHOLD) != 1:
        return None
    SETTINGS = {"mallopt": {"M_MMAP_THRESHOLD": THRESHOLD, "M_TRIM_THRESHOLD": THRESHOLD}}
    return SETTINGS
