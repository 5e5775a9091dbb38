"""Which tensors passed a validation, remembered by identity and version.

A check that is costly to repeat (a layout's index tensors: ``O(nnzb)`` host work, and a
device-to-host copy on a GPU) runs once for a group of tensors; :func:`remember` records
that the group passed under a ``tag`` (what was checked, e.g. the block size), and
:func:`is_current` says whether the same tensor objects, unchanged since, passed it.

"Unchanged" means the same object, data pointer and version counter
(``Tensor._version``, which every in-place op bumps, also through views and
``detach()``), so an in-place edit or a ``.data`` swap forgets the pass and the next
call checks again. Inference tensors (made under ``torch.inference_mode()``) have no
version counter; they are remembered by identity and data pointer only, so an in-place
edit of one inside inference mode is not noticed.
"""

from __future__ import annotations

import weakref

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_passed = WeakIdKeyDictionary()  # first tensor of a group -> (tag, ((weakref, state), ...))


def state(t: Tensor) -> tuple:
    """``t``'s data pointer and version counter (``None`` for an inference tensor)."""
    return (t.data_ptr(), None if t.is_inference() else t._version)


def is_current(tensors: tuple[Tensor, ...], tag) -> bool:
    """Whether exactly these tensors, unchanged, passed the check ``tag`` (:func:`remember`)."""
    entry = _passed.get(tensors[0])
    if entry is None or entry[0] != tag or len(entry[1]) != len(tensors):
        return False
    return all(ref() is t and state(t) == passed for (ref, passed), t in zip(entry[1], tensors))


def remember(tensors: tuple[Tensor, ...], tag) -> None:
    """Record that ``tensors``, as they are now, passed the check ``tag``."""
    _passed[tensors[0]] = (tag, tuple((weakref.ref(t), state(t)) for t in tensors))
