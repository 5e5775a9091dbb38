"""Depth schedules for the skip weight ``alpha`` (docs/design.md, "Schedules"; Zhang et al. 2024).

Zhang et al. scale only the identity path, ``x_{l+1} = alpha_l x_l + f(x_l)``, with
``alpha_l`` falling linearly with depth. The product ``alpha_eff = prod(alpha_l)`` is
the knob that matters (Zhang et al.'s released ViT-B/16 MAE setting, ``alpha_min = 0.7``
over 24 sub-layers, has ``alpha_eff`` about 1.8e-2; ranges of ``alpha_eff`` or
``alpha_min`` said to be best or unstable are not in the released code and are not
verified here).
"""

from __future__ import annotations

import math


def _check_layers(num_layers) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    return num_layers


def _check_alpha(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def constant(num_layers: int, value: float = 1.0) -> list[float]:
    """``[value] * num_layers``: every block gets the same ``alpha``."""
    return [_check_alpha(value, "value")] * _check_layers(num_layers)


def decayed(num_layers: int, alpha_min: float, per_sublayer: bool = False) -> list[float]:
    """Linearly decayed ``alpha`` values, falling to ``alpha_min`` at the last layer.

    ``per_sublayer=False``: the paper's formula, ``alpha_l = 1 - l * (1 - alpha_min) / L``
    for ``l = 1..L`` (``L = num_layers`` values, the first ``1 - delta``, the last
    ``alpha_min``).

    ``per_sublayer=True``: the official MAE code's spread over the ``2L`` sub-layers of
    a ViT (attention and MLP residuals each get their own value),
    ``1 - linspace(0, 1, 2L) * (1 - alpha_min)``: first ``1.0``, last ``alpha_min``.
    """
    num_layers = _check_layers(num_layers)
    alpha_min = _check_alpha(alpha_min, "alpha_min")
    if not 0 <= alpha_min <= 1:
        raise ValueError(f"alpha_min must be in [0, 1], got {alpha_min}")
    if per_sublayer:
        n = 2 * num_layers
        return [1.0 - (i / (n - 1)) * (1.0 - alpha_min) for i in range(n)]
    delta = (1.0 - alpha_min) / num_layers
    return [1.0 - delta * layer for layer in range(1, num_layers)] + [alpha_min]


def effective_alpha(alphas) -> float:
    """``prod(alphas)``: the total down-weighting of the input's identity path."""
    return math.prod(float(a) for a in alphas)


def alpha_min_for(num_layers: int, alpha_eff: float, per_sublayer: bool = False, tol: float = 1e-12) -> float:
    """The ``alpha_min`` whose :func:`decayed` schedule has product ``alpha_eff``.

    Solved by bisection (the product grows monotonically with ``alpha_min``).
    ``alpha_eff`` must lie in ``(0, 1]``.
    """
    alpha_eff = _check_alpha(alpha_eff, "alpha_eff")
    if not 0 < alpha_eff <= 1:
        raise ValueError(f"alpha_eff must be in (0, 1], got {alpha_eff}")
    if not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if effective_alpha(decayed(num_layers, mid, per_sublayer)) < alpha_eff:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
