"""``cnn``: a ResNet-14 on cluttered digits with identity, orthogonal, sparse, block-orthogonal
and structural skips.

Lechner et al. (2022) report that in CNNs sparse entangled mappings can help
generalisation while orthogonal ones hurt. Here a CIFAR-style ResNet-14 (channels
8/16/32; 4 identity skips over the channels, the 2 projection shortcuts stay) is
trained on the generated cluttered-digits task (:mod:`entskip.experiments.images`:
16x16 canvases, 1000 training and 1000 test images, raw-pixel kNN about 0.45) with
each mapping in every identity skip (``alpha = 1``), over 5 seeds; each seed's data
and initial weights are shared by all mappings, and the result is the paired
difference of test accuracy to the identity run with its 95 % t-interval.

Mappings (entskip's defaults, :mod:`entskip.mappings`): ``orthogonal`` (Haar, frozen),
``sparse`` (block-unipotent ``I + 0.15 N`` in 2x2 blocks at density 1/2: 1, 3 and 7
off-diagonal blocks per full block row at widths 8, 16, 32; every eigenvalue 1,
spectral norm 1.15-1.2), ``block_orthogonal`` (4x4 Haar blocks), ``structural``
(correlation ``0.1^|i-j|``, bandwidth 4: unit diagonal, eigenvalues 0.82-1.22).
"""

from __future__ import annotations

from functools import partial

from entskip.models import ResNet

from . import compare, images
from .common import Optim, Settings, arm_verdicts

EPOCHS = 12
TRAIN_SIZE = 1000
TEST_SIZE = 1000
SEEDS = 5
CLAIM = "CNNs: sparse entangled mappings can help generalisation; orthogonal mappings hurt performance"
MAPPINGS = {
    "identity": {},
    "orthogonal": {},
    "sparse": {"density": 0.5, "block": 2},
    "block_orthogonal": {"block": 4},
    "structural": {"block": 4},
}


def setup() -> compare.Setup:
    """The ResNet-14 / cluttered-digits comparison (see the module docstring)."""
    return compare.Setup(
        build=partial(ResNet, depth=14, width=8, num_classes=10, in_channels=1),
        data=partial(images.load, train_size=TRAIN_SIZE, test_size=TEST_SIZE),
        mappings=MAPPINGS,
        optim=Optim(lr=2e-3, weight_decay=5e-4, batch_size=64),
        describe={
            "model": "ResNet(depth=14, width=8, in_channels=1)",
            "data": f"cluttered digits {images.SIZE}x{images.SIZE} (entskip.experiments.images), "
            f"{TRAIN_SIZE} train / {TEST_SIZE} test",
        },
    )


#: The sign of the paired difference (mapping - identity) each part of the claim predicts:
#: sparse "can help" (> 0), orthogonal "hurt" (< 0); the other kinds are reported with
#: the sign a help (structural) or a harm (block_orthogonal) would have.
EXPECTED = {"sparse": +1, "orthogonal": -1, "block_orthogonal": -1, "structural": +1}


def verdicts(results: dict) -> list[dict]:
    """Each part of the claim against its paired 95 % interval (:data:`EXPECTED`,
    :func:`.common.arm_verdicts`)."""
    return arm_verdicts(results, EXPECTED)


def run(settings: Settings) -> dict:
    """Train every mapping for every seed; returns the :func:`compare.run` result and the verdicts."""
    result = compare.run({"cluttered_digits": setup()}, settings, EPOCHS, SEEDS, "cnn")
    return {"claim": CLAIM, **result, "verdicts": verdicts(result["results"])}


plot = compare.plot
