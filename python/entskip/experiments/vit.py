"""``vit``: a small Vision Transformer on the digits with identity, orthogonal, sparse and structural skips.

Lechner et al. (2022) report that in Vision Transformers, as in CNNs, sparse entangled
mappings can help generalisation while orthogonal ones hurt. Here a pre-norm ViT
(2x2 patches of the 8x8 digits: 16 tokens and a class token, width 64, 4 blocks of 4
heads, MLP ratio 2; 8 skips, attention and MLP) is trained on scikit-learn's digits
with each mapping in every skip (``alpha = 1``), over several seeds, on the same
small training set as ``cnn`` (300 images, 1497 test images, split by the seed).

Mappings: ``orthogonal`` (Haar, frozen), ``sparse`` (density 1/4 in 8x8 blocks: 2
non-zero blocks per block row), ``structural`` (``rho^|i-j|``, ``rho = 0.5``,
bandwidth 8, in 8x8 blocks); all spectral norm 1.
"""

from __future__ import annotations

from functools import partial

from entskip.models import ViT

from . import compare
from .common import Optim, Settings, load_digits

EPOCHS = 60
TRAIN_SIZE = 300
SEEDS = 3
CLAIM = "ViTs: sparse entangled mappings can help generalisation; orthogonal mappings hurt performance"


def setup() -> compare.Setup:
    """The ViT / digits comparison (see the module docstring)."""
    return compare.Setup(
        build=partial(ViT, image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=64, depth=4, num_heads=4, mlp_ratio=2.0),
        data=partial(load_digits, train_size=TRAIN_SIZE),
        mappings={
            "identity": {},
            "orthogonal": {},
            "sparse": {"density": 0.25, "block": 8},
            "structural": {"rho": 0.5, "block": 8},
        },
        optim=Optim(lr=1e-3, weight_decay=0.05, batch_size=64),
        describe={
            "model": "ViT(image_size=8, patch_size=2, in_channels=1, dim=64, depth=4, num_heads=4, mlp_ratio=2)",
            "data": f"sklearn digits 8x8, {TRAIN_SIZE} train / {1797 - TRAIN_SIZE} test",
        },
    )


def run(settings: Settings) -> dict:
    """Train every mapping for every seed; returns the :func:`compare.run` result."""
    return {"claim": CLAIM, **compare.run({"digits": setup()}, settings, EPOCHS, SEEDS, "vit")}


plot = compare.plot
