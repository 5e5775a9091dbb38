"""Small-scale tests of the two papers' claims: ``python -m entskip.experiments <name>``.

Each experiment trains entskip's own models (:mod:`entskip.models`) with skips built
by :func:`entskip.entangle` on data that ships with scikit-learn or is generated
(nothing is downloaded), on the CPU, over 5 seeds that pair the compared arms (same
data and initial weights), and writes ``<name>.json`` (settings, versions, per-seed
results, paired differences with 95 % t-intervals and a verdict per claim) and
``<name>.png``:

- ``cnn``: ResNet-14 on generated cluttered digits (:mod:`.images`), identity /
  orthogonal / sparse / block_orthogonal / structural skips (Lechner et al. 2022).
- ``vit``: a small ViT on the same task, the same five mappings.
- ``rnn``: a residual RNN, identity vs orthogonal recurrent skip, on a generated
  time-variant and a generated time-invariant task.
- ``mae``: Zhang et al.'s MAE (decoder skips, zero-init in both arms) with standard vs
  depth-decayed identity shortcuts (``alpha_min = 0.7``), and an ablation without
  the decoder skips: kNN and linear-probe accuracy and effective rank per layer.

Needs scikit-learn (the digits), scipy (the t-intervals), matplotlib and tqdm besides torch.
"""

from __future__ import annotations

import time

from . import cnn, mae, rnn, vit
from .common import Settings, write_json

EXPERIMENTS = {"cnn": cnn, "vit": vit, "rnn": rnn, "mae": mae}

__all__ = ["EXPERIMENTS", "Settings", "run_experiment"]


def run_experiment(name: str, settings: Settings) -> dict:
    """Run the experiment ``name`` and write ``<settings.out>/<name>.json`` and ``.png``.

    Returns the results written to the JSON: ``experiment``, ``claim``, the setup, the
    environment, ``results`` and ``elapsed_s`` (wall-clock seconds, plots excluded).
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {sorted(EXPERIMENTS)}")
    module = EXPERIMENTS[name]
    start = time.perf_counter()
    results = {"experiment": name, **module.run(settings)}
    results["elapsed_s"] = round(time.perf_counter() - start, 1)
    write_json(results, settings.out / f"{name}.json")
    module.plot(results, settings.out / f"{name}.png")
    return results
