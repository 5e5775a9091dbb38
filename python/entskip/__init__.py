"""entskip: fused entangled residual skips, ``y = alpha * (x @ M^T) + branch``.

Quick use::

    import entskip
    skip = entskip.EntangledSkip(256, mapping="sparse", density=0.125, block=32, alpha=0.8)
    y = skip(x, f(x))                       # x: (..., 256) or (N, 256, H, W)
    y = entskip.skip_add(x, skip.mapping, f(x), alpha=0.8)   # functional form
"""

from . import mappings, reference, schedules
from .backends import get_backend, native_available, set_backend, use_backend
from .layout import BlockLayout
from .modules import EntangledResidual, EntangledSkip
from .ops import skip_add

__version__ = "0.1.0"

__all__ = [
    "BlockLayout",
    "EntangledResidual",
    "EntangledSkip",
    "get_backend",
    "mappings",
    "native_available",
    "reference",
    "schedules",
    "set_backend",
    "skip_add",
    "use_backend",
]
