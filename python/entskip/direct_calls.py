"""Eager calls of the elementwise ops without ``torch.ops``' argument matching.

``entskip._C.identity_skip_add(x, alpha, branch)`` and
``entskip._C.permutation_skip_add(x, index, inverse, alpha, branch)`` (features last) call
``torch.ops.entskip.identity_skip_add`` / ``permutation_skip_add`` through the dispatcher
(``csrc/python_module.cpp``): the same op, autograd, dispatch modes and kernels, at a few
microseconds less a call than ``torch.ops``, which matches every argument against the
schema in Python-facing C++ first. On a ViT block's skip (about 0.1-0.4 ms on the CPU) that
matching is several percent of the call.

They do not handle ``__torch_function__``, and ``torch.compile`` cannot trace them, so
:func:`allowed` sends tensor subclasses, an active torch function mode (``torch.device``
as a context manager is one) and compilation to ``torch.ops``.

``entskip._C.plain_skip_add`` serves :func:`entskip.skip_add`'s common eager call on the
CPU (:func:`plain_cpu_skip_add`): it checks the arguments in C++ and runs one of the two
ops, or returns ``None`` for anything but that plain case. On a ViT-Ti block's skip, whose
op takes about 0.2 ms, the Python checks it replaces cost some 40 us a call once other work
has evicted their objects from the caches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends

_PLAIN = (Tensor, torch.nn.Parameter)  # no __torch_function__ of their own
_C = backends.native_module()  # loaded: an op family reaches these calls only on a native backend


def allowed(x: Tensor, branch: Tensor | None, alpha: Tensor) -> bool:
    """Whether ``x``, ``branch`` and ``alpha`` may go to a direct call (see the module doc)."""
    return (type(x) in _PLAIN and type(alpha) in _PLAIN and (branch is None or type(branch) in _PLAIN)
            and not torch._C._is_torch_function_mode_enabled() and not torch.compiler.is_compiling())


def identity_skip_add(x: Tensor, alpha: Tensor, branch: Tensor | None) -> Tensor:
    """``torch.ops.entskip.identity_skip_add(x, alpha, branch)``, directly where :func:`allowed`."""
    if allowed(x, branch, alpha):
        return _C.identity_skip_add(x, alpha, branch)
    return torch.ops.entskip.identity_skip_add(x, alpha, branch)


def permutation_skip_add(x: Tensor, index: Tensor, inverse: Tensor, alpha: Tensor, branch: Tensor | None) -> Tensor:
    """``torch.ops.entskip.permutation_skip_add(x, index, inverse, alpha, branch)`` (features
    last), directly where :func:`allowed` (``index`` and ``inverse`` are the mapping's buffers)."""
    if allowed(x, branch, alpha):
        return _C.permutation_skip_add(x, index, inverse, alpha, branch)
    return torch.ops.entskip.permutation_skip_add(x, index, inverse, alpha, branch, False)


def plain_cpu_skip_add(x, mapping, branch, alpha) -> Tensor | None:
    """``skip_add(x, mapping, branch, alpha)`` (features last) for an elementwise ``mapping``
    (``None``, an identity or permutation mapping) on plain CPU tensors, or ``None`` where
    the call is not that case (see ``entskip._C.plain_skip_add``); the CPU backend must be
    native (:data:`entskip.backends.native_cpu`)."""
    if type(x) not in _PLAIN or not x.is_cpu or torch.compiler.is_compiling():
        return None
    if mapping is None:
        return _C.plain_skip_add(x, None, None, branch, alpha, -1)
    operands = mapping.elementwise_operands()
    if operands is None:
        return None
    return _C.plain_skip_add(x, *operands, branch, alpha, mapping.in_features)
