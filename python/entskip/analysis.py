"""The measures the two papers analyse skips and features with.

- :func:`effective_rank`: Roy & Vetterli's entropy-based effective rank of a feature
  matrix, the measure Zhang et al. (2024) track through the layers of an MAE encoder.
- :func:`skip_jacobian`, :func:`jacobian_norm`, :func:`eigenvalue_spectrum`: the
  Jacobian of a skip ``x -> alpha * (x @ M^T)`` taken by autograd through entskip's op,
  its spectral norm and its eigenvalues: the attributes an entangled mapping is meant
  to share with the identity (Lechner et al. 2022).
- :func:`knn_accuracy`, :func:`linear_probe`: the two standard read-outs of frozen
  features (weighted cosine kNN as in DINO and MAE evaluations; multinomial logistic
  regression).

Everything runs in plain PyTorch on any device; results come back as Python floats or
CPU tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .mappings import Mapping
from .modules import EntangledSkip
from .ops import skip_add

__all__ = [
    "effective_rank",
    "eigenvalue_spectrum",
    "jacobian_norm",
    "knn_accuracy",
    "linear_probe",
    "skip_jacobian",
]


def _matrix(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or not (x.dtype.is_floating_point or x.dtype.is_complex):
        raise ValueError(f"{name} must be a 2-D floating-point tensor (N, D), got {getattr(x, 'shape', type(x))}")
    return x.detach()


def effective_rank(features: Tensor, *, center: bool = False) -> float:
    """Effective rank of a ``(N, D)`` matrix (Roy & Vetterli 2007).

    With ``s_1 >= ... >= s_Q`` the singular values (``Q = min(N, D)``) and
    ``p_i = s_i / sum_j s_j``, the effective rank is ``exp(-sum_i p_i log p_i)``
    (``0 log 0 = 0``): ``Q`` for a matrix with equal singular values, 1 for a rank-1
    matrix, and in between otherwise. Computed in float64.

    Args:
        features: ``(N, D)``, one row per sample (e.g. mean-pooled tokens of a layer).
        center: subtract the column means first (the rank of the features' spread
            rather than of the raw matrix, whose mean direction can dominate).

    Raises:
        ValueError: ``features`` is not a 2-D floating matrix, or it is all zeros (the
            distribution ``p`` is undefined).
    """
    x = _matrix(features, "features").to(torch.float64)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    s = torch.linalg.svdvals(x)
    total = s.sum()
    if not total > 0:
        raise ValueError("effective rank is undefined for a zero matrix")
    p = s / total
    return float(torch.exp(-torch.special.xlogy(p, p).sum()))


def _skip_parts(skip, alpha) -> tuple[object, float | Tensor, int, int]:
    """``(mapping for skip_add, alpha, D_out, D_in)`` of an EntangledSkip, a Mapping or a dense matrix."""
    if isinstance(skip, EntangledSkip):
        if alpha is not None:
            raise ValueError("alpha is taken from the EntangledSkip; do not pass it too")
        mapping, alpha = skip.mapping, skip.alpha.detach()
        return mapping, alpha, mapping.out_features, mapping.in_features
    alpha = 1.0 if alpha is None else alpha
    if isinstance(skip, Mapping):
        return skip, alpha, skip.out_features, skip.in_features
    if isinstance(skip, Tensor) and skip.dim() == 2:
        return skip.detach(), alpha, skip.shape[0], skip.shape[1]
    raise TypeError(f"skip must be an EntangledSkip, an entskip Mapping or a 2-D tensor, got {type(skip).__name__}")


def skip_jacobian(skip: EntangledSkip | Mapping | Tensor, alpha: float | None = None) -> Tensor:
    """The Jacobian ``d y / d x`` of the skip ``y = alpha * (x @ M^T)``: ``alpha * M``.

    Taken by autograd through :func:`entskip.skip_add` (the backend's own backward), in
    float64, with one backward pass: for ``x`` of shape ``(D_out, D_in)`` the gradient
    of ``sum_i y[i, i]`` with respect to ``x`` is ``alpha * M`` row by row. The skip is
    linear, so the Jacobian does not depend on the point it is taken at.

    Args:
        skip: an :class:`entskip.EntangledSkip` (its mapping and ``alpha``), an
            :class:`entskip.mappings.Mapping` or a dense ``(D_out, D_in)`` tensor.
        alpha: the skip weight for a mapping or a matrix (default 1); not allowed with
            an ``EntangledSkip``, which carries its own.

    Returns:
        ``(D_out, D_in)`` float64 CPU tensor.
    """
    mapping, alpha, d_out, d_in = _skip_parts(skip, alpha)
    device = mapping.device if isinstance(mapping, Tensor) else next(
        (t.device for t in (*mapping.parameters(), *mapping.buffers())), torch.device("cpu")
    )
    x = torch.zeros(d_out, d_in, dtype=torch.float64, device=device, requires_grad=True)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(device=device, dtype=torch.float64)
    with torch.enable_grad():
        y = skip_add(x, mapping, None, alpha)
        (grad,) = torch.autograd.grad(y.diagonal().sum(), x)
    return grad.cpu()


def jacobian_norm(skip: EntangledSkip | Mapping | Tensor, alpha: float | None = None) -> float:
    """Spectral norm (largest singular value) of the skip's Jacobian ``alpha * M``.

    1 for the identity and for any orthogonal mapping at ``alpha = 1``, ``|alpha|`` for
    a scaled identity. Arguments as for :func:`skip_jacobian`.
    """
    return float(torch.linalg.matrix_norm(skip_jacobian(skip, alpha), ord=2))


def eigenvalue_spectrum(skip: EntangledSkip | Mapping | Tensor, alpha: float | None = None) -> Tensor:
    """Eigenvalues of the skip's (square) Jacobian ``alpha * M``, by decreasing modulus.

    On the unit circle for orthogonal and permutation mappings; all ``alpha`` for a
    scaled identity. Arguments as for :func:`skip_jacobian`.

    Returns:
        ``(D,)`` complex128 CPU tensor.

    Raises:
        ValueError: the mapping is not square.
    """
    jac = skip_jacobian(skip, alpha)
    if jac.shape[0] != jac.shape[1]:
        raise ValueError(f"eigenvalues need a square mapping, got {tuple(jac.shape)}")
    eig = torch.linalg.eigvals(jac)
    return eig[torch.argsort(eig.abs(), descending=True, stable=True)]


def _labelled(x: Tensor, y: Tensor, name: str) -> tuple[Tensor, Tensor]:
    x = _matrix(x, f"{name}_features")
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.dtype.is_floating_point or y.dtype.is_complex:
        raise ValueError(f"{name}_labels must be an integer tensor of shape ({x.shape[0]},)")
    return x, y.detach().to(x.device)


@torch.no_grad()
def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Accuracy of a weighted k-nearest-neighbour classifier on frozen features.

    Each test row votes among its ``k`` most cosine-similar training rows, neighbour
    ``j`` with weight ``exp(sim_j / temperature)`` for its label (the kNN monitor of
    DINO and of MAE-style evaluations); the class with the largest total wins.

    Shapes: ``train_features (N, D)``, ``train_labels (N,)`` integers,
    ``test_features (M, D)``, ``test_labels (M,)``. Returns the fraction correct.
    """
    xtr, ytr = _labelled(train_features, train_labels, "train")
    xte, yte = _labelled(test_features, test_labels, "test")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train and test features differ in width: {xtr.shape[1]} vs {xte.shape[1]}")
    if not 1 <= k <= xtr.shape[0]:
        raise ValueError(f"k must be in [1, {xtr.shape[0]}], got {k}")
    xtr, xte = F.normalize(xtr.float(), dim=1), F.normalize(xte.float().to(xtr.device), dim=1)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    correct = 0
    for start in range(0, xte.shape[0], 1024):
        sim, idx = (xte[start : start + 1024] @ xtr.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, ytr[idx], (sim / temperature).exp())
        correct += int((votes.argmax(dim=1) == yte[start : start + 1024]).sum())
    return correct / xte.shape[0]


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
) -> float:
    """Test accuracy of a linear classifier trained on frozen features.

    Features are standardised with the training set's mean and standard deviation; a
    multinomial logistic regression (weights and bias, zero-initialised, L2 penalty
    ``weight_decay / 2 * |W|^2``) is fitted on the whole training set with L-BFGS
    (``max_iter`` iterations, strong-Wolfe line search), which is deterministic.

    Shapes as for :func:`knn_accuracy`. Returns the fraction of test rows correct.
    """
    xtr, ytr = _labelled(train_features, train_labels, "train")
    xte, yte = _labelled(test_features, test_labels, "test")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train and test features differ in width: {xtr.shape[1]} vs {xte.shape[1]}")
    xtr, xte = xtr.to(torch.float64), xte.to(xtr.device, torch.float64)
    mean, std = xtr.mean(dim=0), xtr.std(dim=0).clamp_min(1e-8)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    num_classes = int(max(ytr.max(), yte.max())) + 1
    weight = torch.zeros(xtr.shape[1], num_classes, dtype=torch.float64, device=xtr.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=xtr.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ weight + bias, ytr) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((xte @ weight + bias).argmax(dim=1) == yte).double().mean())
