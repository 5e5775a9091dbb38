"""Backward ops that are differentiable once: :func:`run_once_differentiable`.

The BSR and dense skip-adds' backward ops have no derivative of their own. Without care,
``create_graph=True`` would record them with no autograd kernel, and a second derivative
through ``dx``, ``dM`` or ``dalpha`` would come out silently wrong (PyTorch only warns).
Here their outputs are attached to a ``DelayedError`` node instead, as the identity and
permutation ops' C++ autograd does: a second derivative raises.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor


def run_once_differentiable(backward_inputs: Iterable[Tensor | None], run: Callable[[], tuple], what: str) -> tuple:
    """``run()`` (a backward op's outputs, tensors or ``None``) without recording a graph.

    Under ``create_graph=True``, where one of ``backward_inputs`` (the upstream gradient
    and the saved tensors) requires grad, the defined outputs come back attached to a
    ``DelayedError`` node: differentiating them again raises a ``RuntimeError`` naming
    ``what``. Otherwise the outputs are returned as they are.
    """
    recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in backward_inputs)
    with torch.no_grad():
        outputs = tuple(run())
    if not recording:
        return outputs
    error = torch._C._functions.DelayedError(
        f"entskip: {what} is differentiable once; its backward has no derivative".encode(), len(outputs))
    wrapped = error(*(None if t is None else t.detach().requires_grad_() for t in outputs))
    return tuple(wrapped) if isinstance(wrapped, tuple) else (wrapped,)
