"""The two activation formats of the BSR and dense op families, and copies between them.

- features last: ``x (rows, D)``;
- features first: ``x (N, D, S)``, an ``NCHW`` map viewed with ``S = H * W``.

``branch``, the result, ``grad`` and ``dx`` are in ``x``'s format. The CUDA C++ kernels
take features last only: :func:`rows_forward` and :func:`rows_backward` run them on
features-last copies ``(N * S, D)`` of features-first activations and copy the
activation-shaped results back.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor


def with_features(x: Tensor, features: int) -> list[int]:
    """``x``'s shape with ``features`` features (dim 1, in both formats)."""
    return [x.shape[0], features, *x.shape[2:]]


def to_rows(t: Tensor) -> Tensor:
    """A features-first ``(N, D, S)`` tensor as a features-last ``(N * S, D)`` copy."""
    return t.mT.reshape(-1, t.shape[1])


def from_rows(t: Tensor, like: Tensor) -> Tensor:
    """The inverse of :func:`to_rows`: ``(N * S, D)`` as a contiguous ``(N, D, S)`` with the
    ``N`` and ``S`` of the features-first ``like`` (``N = 0`` included)."""
    return t.reshape(like.shape[0], like.shape[2], t.shape[1]).mT.contiguous()


def rows_forward(run: Callable[[Tensor, Tensor | None], Tensor], x: Tensor, branch: Tensor | None) -> Tensor:
    """``run(x_rows, branch_rows)`` on features-last copies of features-first ``x`` and
    ``branch``, its result back in ``x``'s format."""
    return from_rows(run(to_rows(x), None if branch is None else to_rows(branch)), x)


def rows_backward(run: Callable[[Tensor, Tensor], tuple], grad: Tensor, x: Tensor) -> tuple:
    """``(dx, dM, dalpha) = run(grad_rows, x_rows)`` on features-last copies, ``dx`` back in
    ``x``'s format (``dM`` and ``dalpha`` have no activation format)."""
    dx, dm, dalpha = run(to_rows(grad), to_rows(x))
    return None if dx is None else from_rows(dx, x), dm, dalpha
