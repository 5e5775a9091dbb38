"""``vit``: a small Vision Transformer on cluttered digits with identity, orthogonal, sparse,
block-orthogonal and structural skips.

Lechner et al. (2022) report that in Vision Transformers, as in CNNs, sparse entangled
mappings can help generalisation while orthogonal ones hurt. Here a pre-norm ViT
(4x4 patches of the 16x16 cluttered digits of :mod:`entskip.experiments.images`: 16
tokens and a class token, width 64, 4 blocks of 4 heads, MLP ratio 2; 8 skips,
attention and MLP) is trained with each mapping in every skip (``alpha = 1``) over 5
seeds on the same task as ``cnn`` (1000 training and 1000 test images); the result
is the paired difference of test accuracy to the identity run with its 95 % t-interval.

Mappings (entskip's defaults): ``orthogonal`` (Haar, frozen), ``sparse``
(block-unipotent ``I + 0.15 N`` in 8x8 blocks at density 1/4: one off-diagonal block
per block row but the first of its order; every eigenvalue 1, spectral norm 1.15),
``block_orthogonal`` (8x8 Haar blocks), ``structural`` (correlation ``0.1^|i-j|``,
bandwidth 8: unit diagonal, eigenvalues 0.82-1.22).
"""

from __future__ import annotations

from functools import partial

from entskip.models import ViT

from . import compare, images
from .cnn import EXPECTED
from .common import Optim, Settings, arm_verdicts

EPOCHS = 16
TRAIN_SIZE = 1000
TEST_SIZE = 1000
SEEDS = 5
CLAIM = "ViTs: sparse entangled mappings can help generalisation; orthogonal mappings hurt performance"
MAPPINGS = {
    "identity": {},
    "orthogonal": {},
    "sparse": {"density": 0.25, "block": 8},
    "block_orthogonal": {"block": 8},
    "structural": {"block": 8},
}


def setup() -> compare.Setup:
    """The ViT / cluttered-digits comparison (see the module docstring)."""
    return compare.Setup(
        build=partial(
            ViT, image_size=images.SIZE, patch_size=4, in_channels=1, num_classes=10, dim=64, depth=4, num_heads=4,
            mlp_ratio=2.0,
        ),
        data=partial(images.load, train_size=TRAIN_SIZE, test_size=TEST_SIZE),
        mappings=MAPPINGS,
        optim=Optim(lr=1e-3, weight_decay=0.05, batch_size=64),
        describe={
            "model": f"ViT(image_size={images.SIZE}, patch_size=4, in_channels=1, dim=64, depth=4, num_heads=4, mlp_ratio=2)",
            "data": f"cluttered digits {images.SIZE}x{images.SIZE} (entskip.experiments.images), "
            f"{TRAIN_SIZE} train / {TEST_SIZE} test",
        },
    )


def run(settings: Settings) -> dict:
    """Train every mapping for every seed; returns the :func:`compare.run` result and the verdicts."""
    result = compare.run({"cluttered_digits": setup()}, settings, EPOCHS, SEEDS, "vit")
    return {"claim": CLAIM, **result, "verdicts": arm_verdicts(result["results"], EXPECTED)}


plot = compare.plot
