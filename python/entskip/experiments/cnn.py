"""``cnn``: a ResNet-20 on the digits with identity, orthogonal, sparse and structural skips.

Lechner et al. (2022) report that in CNNs sparse entangled mappings can help
generalisation while orthogonal ones hurt. Here a CIFAR-style ResNet-20 (width 16,
channels 16/32/64; 7 identity skips, the 2 projection shortcuts stay) is trained on
scikit-learn's 8x8 digits with each mapping in every identity skip (``alpha = 1``),
over several seeds. The training set is small (300 images, 1497 test images, split
by the seed): with 1000 training images all four mappings reached 98.2-98.4% test
accuracy, a ceiling at which no difference can show.

Mappings: ``orthogonal`` (Haar, frozen), ``sparse`` (density 1/4 in 2x2 blocks, so 2,
4 and 8 non-zero blocks per block row at widths 16, 32, 64), ``structural``
(``rho^|i-j|``, ``rho = 0.5``, bandwidth 4, in 4x4 blocks); all spectral norm 1.
"""

from __future__ import annotations

from functools import partial

from entskip.models import ResNet

from . import compare
from .common import Optim, Settings, load_digits

EPOCHS = 40
TRAIN_SIZE = 300
SEEDS = 3
CLAIM = "CNNs: sparse entangled mappings can help generalisation; orthogonal mappings hurt performance"


def setup() -> compare.Setup:
    """The ResNet-20 / digits comparison (see the module docstring)."""
    return compare.Setup(
        build=partial(ResNet, depth=20, width=16, num_classes=10, in_channels=1),
        data=partial(load_digits, train_size=TRAIN_SIZE),
        mappings={
            "identity": {},
            "orthogonal": {},
            "sparse": {"density": 0.25, "block": 2},
            "structural": {"rho": 0.5, "block": 4},
        },
        optim=Optim(lr=2e-3, weight_decay=5e-4, batch_size=64),
        describe={
            "model": "ResNet(depth=20, width=16, in_channels=1)",
            "data": f"sklearn digits 8x8, {TRAIN_SIZE} train / {1797 - TRAIN_SIZE} test",
        },
    )


def run(settings: Settings) -> dict:
    """Train every mapping for every seed; returns the :func:`compare.run` result."""
    return {"claim": CLAIM, **compare.run({"digits": setup()}, settings, EPOCHS, SEEDS, "cnn")}


plot = compare.plot
