"""Small-scale reproductions of the two papers' findings: ``python -m entskip.experiments <name>``.

Each experiment trains entskip's own models (:mod:`entskip.models`) with skips built
by :func:`entskip.entangle` on data that ships with scikit-learn or is generated
(nothing is downloaded), on the CPU in a few minutes, and writes ``<name>.json`` (the
settings, per-seed results and their mean and standard deviation) and ``<name>.png``:

- ``cnn``: ResNet-20 on the 8x8 digits, identity / orthogonal / sparse / structural
  skips (Lechner et al. 2022).
- ``vit``: a small ViT on the digits, the same four mappings.
- ``rnn``: a residual RNN, identity vs orthogonal recurrent skip, on a generated
  time-variant and a generated time-invariant task.
- ``mae``: a masked autoencoder with standard vs depth-decayed identity shortcuts
  (Zhang et al. 2024): kNN and linear-probe accuracy and effective rank per layer.

Needs scikit-learn (the digits), matplotlib and tqdm besides torch.
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
