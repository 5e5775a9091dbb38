"""entskip: fused entangled residual skips, ``y = alpha * (x @ M^T) + branch``.

Quick use::

    import entskip
    skip = entskip.EntangledSkip(256, mapping="sparse", density=0.125, block=32, alpha=0.8)
    y = skip(x, f(x))                       # x: (..., 256) or (N, 256, H, W)
    y = entskip.skip_add(x, skip.mapping, f(x), alpha=0.8)   # functional form
    model = entskip.entangle(model, mapping="sparse", schedule="decay")   # a whole network
"""

from . import convert, mappings, models, reference, schedules
from .backends import get_backend, native_available, set_backend, use_backend
from .convert import BlockAdapter, SkipSpec, count_skips, entangle, register_adapter, supported_blocks
from .layout import BlockLayout
from .modules import EntangledResidual, EntangledSkip
from .ops import skip_add

from ._version import __version__

__all__ = [
    "BlockAdapter",
    "BlockLayout",
    "EntangledResidual",
    "EntangledSkip",
    "SkipSpec",
    "convert",
    "count_skips",
    "entangle",
    "get_backend",
    "mappings",
    "models",
    "native_available",
    "reference",
    "register_adapter",
    "schedules",
    "set_backend",
    "skip_add",
    "supported_blocks",
    "use_backend",
]
