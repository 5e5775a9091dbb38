"""A generated image task for ``cnn``, ``vit`` and ``mae``: cluttered, transformed digits.

scikit-learn's bundled 8x8 digits (1797 images; nothing is downloaded) are drawn on a
larger ``size x size`` canvas (default 16x16) with a random rotation, scale and
position, over clutter (fragments of other digits of the same split) and pixel noise.
Raw-pixel classifiers are then far from the ceiling (raw-pixel kNN about 0.3-0.4 at
the defaults, against about 0.98 on the plain 8x8 digits), while the digit stays
recognisable, so there is room for architectural differences to show.

The source digits are split by the seed first (1000 for training, 797 for testing), so
no source digit, nor any fragment of one, appears in both splits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SIZE = 16
ROTATION_DEG = 30.0
SCALE = (0.55, 0.75)  # digit side as a fraction of the canvas side
FRAGMENTS = 2
FRAGMENT_SIZE = 5  # pixels of the canvas
NOISE = 0.1
SOURCE_TRAIN = 1000


def _pose(n: int, generator: torch.Generator, scale: tuple[float, float]) -> Tensor:
    """``(n, 2, 3)`` affine maps from canvas to digit coordinates (``grid_sample``'s convention)."""
    theta = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(ROTATION_DEG)
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - s)[:, None]
    cos, sin = theta.cos() / s, theta.sin() / s
    rot = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], 1)  # R(-theta) / s
    return torch.cat([rot, -(rot @ shift[..., None])], dim=2)


def _render(digits: Tensor, pose: Tensor, size: int) -> Tensor:
    grid = F.affine_grid(pose, (digits.shape[0], 1, size, size), align_corners=False)
    return F.grid_sample(digits, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cluttered(sources: Tensor, n: int, generator: torch.Generator, size: int = SIZE) -> tuple[Tensor, Tensor]:
    """``n`` images drawn from ``sources = (images (M, 1, 8, 8) in [0, 1], labels (M,))``.

    Each image: one source digit at a random pose, ``FRAGMENTS`` windows of
    ``FRAGMENT_SIZE`` pixels cut from other random source digits at random poses, the
    pixelwise maximum of the three, plus ``N(0, NOISE^2)`` noise.

    Returns ``x (n, 1, size, size)`` float32 and ``y (n,)`` int64.
    """
    images, labels = sources
    pick = torch.randint(len(labels), (n,), generator=generator)
    canvas = _render(images[pick], _pose(n, generator, SCALE), size)
    for _ in range(FRAGMENTS):
        other = images[torch.randint(len(labels), (n,), generator=generator)]
        piece = _render(other, _pose(n, generator, SCALE), size)
        corner = torch.randint(size - FRAGMENT_SIZE + 1, (n, 2), generator=generator)
        rows, cols = torch.arange(size)[None, :], torch.arange(size)[None, :]
        inside_r = (rows >= corner[:, :1]) & (rows < corner[:, :1] + FRAGMENT_SIZE)
        inside_c = (cols >= corner[:, 1:]) & (cols < corner[:, 1:] + FRAGMENT_SIZE)
        window = (inside_r[:, :, None] & inside_c[:, None, :])[:, None].float()
        canvas = torch.maximum(canvas, piece * window)
    canvas = canvas + NOISE * torch.randn(canvas.shape, generator=generator)
    return canvas, labels[pick]


def load(seed: int, train_size: int = 2000, test_size: int = 1000, size: int = SIZE, device="cpu") -> dict[str, Tensor]:
    """The cluttered-digits task drawn from ``seed``: ``{"x_train", "y_train", "x_test", "y_test"}``.

    Images ``(N, 1, size, size)`` float32, standardised with the training split's scalar
    mean and standard deviation; labels int64 in ``0..9``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    train, test = order[:SOURCE_TRAIN], order[SOURCE_TRAIN:]
    x_train, y_train = cluttered((images[train], labels[train]), train_size, generator, size)
    x_test, y_test = cluttered((images[test], labels[test]), test_size, generator, size)
    mean, std = x_train.mean(), x_train.std()
    return {
        "x_train": ((x_train - mean) / std).to(device),
        "y_train": y_train.to(device),
        "x_test": ((x_test - mean) / std).to(device),
        "y_test": y_test.to(device),
    }
