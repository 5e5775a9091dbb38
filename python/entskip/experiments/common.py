"""What every experiment shares: settings, seeding, the digits data, the training loop,
summaries and file output.

Nothing here downloads anything: the images are scikit-learn's bundled ``load_digits``
(1797 grey-scale 8x8 handwritten digits, shipped inside the scikit-learn wheel), and
the sequence tasks are generated (:mod:`entskip.experiments.rnn`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

import entskip


@dataclass
class Settings:
    """How to run an experiment (the command line's options).

    Attributes:
        device: torch device the models train on.
        epochs: training epochs per run; ``None`` takes the experiment's default.
        seed: base seed; run ``i`` of a comparison uses ``seed + i`` for the data split,
            the initialisation, the mappings and the batch order.
        seeds: independent runs per configuration; ``None`` takes the default.
        out: folder the JSON and PNG files go to.
        max_steps: stop each training run after this many optimizer steps (``None``:
            run all epochs); for smoke tests.
        progress: show a progress bar.
    """

    device: str = "cpu"
    epochs: int | None = None
    seed: int = 0
    seeds: int | None = None
    out: Path = Path("experiments/results")
    max_steps: int | None = None
    progress: bool = True

    def resolved(self, epochs: int, seeds: int) -> tuple[int, list[int]]:
        """``(epochs, [seed, seed + 1, ...])`` with the experiment's defaults filled in."""
        epochs = self.epochs if self.epochs is not None else epochs
        count = self.seeds if self.seeds is not None else seeds
        return epochs, [self.seed + i for i in range(count)]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and torch's global generators; return a torch generator
    seeded the same way for explicit use (data splits, batch order)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def load_digits(seed: int, train_size: int = 1000, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """scikit-learn's bundled 8x8 digits, randomly split by ``seed``.

    Pixels (0..16) are standardised with the training split's mean and standard
    deviation (one scalar each).

    Returns:
        ``{"x_train": (train_size, 1, 8, 8), "y_train": (train_size,),
        "x_test": (1797 - train_size, 1, 8, 8), "y_test": (...)}``; images float32,
        labels int64 in ``0..9``.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    train, test = order[:train_size], order[train_size:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return {
        "x_train": images[train].to(device),
        "y_train": labels[train].to(device),
        "x_test": images[test].to(device),
        "y_test": labels[test].to(device),
    }


@dataclass
class Optim:
    """Optimiser settings of a training run: AdamW with a cosine learning-rate decay
    to zero over all steps, optional gradient-norm clipping."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    batch_size: int = 64
    clip_grad: float | None = None


def train(
    model: nn.Module,
    data: tuple[Tensor, ...],
    loss_fn: Callable[[nn.Module, tuple[Tensor, ...]], Tensor],
    *,
    epochs: int,
    optim: Optim,
    generator: torch.Generator,
    max_steps: int | None = None,
    bar=None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> dict[str, list[float]]:
    """Train ``model`` on in-memory tensors: the loop every experiment uses.

    Each epoch shuffles the rows of ``data`` (tensors with a common first dimension,
    drawn with ``generator``), runs ``loss_fn(model, batch)`` on mini-batches of
    ``optim.batch_size`` rows (the last, smaller one included), and steps AdamW.
    After each epoch ``evaluate(model)`` (if given) runs in eval mode under
    ``torch.no_grad`` and its metrics are recorded, and ``bar`` (a tqdm bar) advances
    by one.

    Returns:
        ``{"loss": [mean training loss per epoch], <metric>: [value per epoch], ...}``;
        with ``max_steps`` the lists stop at the epoch where the cap was reached.
    """
    n = data[0].shape[0]
    steps_per_epoch = math.ceil(n / optim.batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(total, 1))))
    history: dict[str, list[float]] = {"loss": []}
    step = 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=generator).to(data[0].device)
        losses = []
        for start in range(0, n, optim.batch_size):
            batch = tuple(t[order[start : start + optim.batch_size]] for t in data)
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if optim.clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), optim.clip_grad)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step >= total:
                break
        history["loss"].append(statistics.fmean(losses))
        if evaluate is not None:
            model.eval()
            with torch.no_grad():
                for key, value in evaluate(model).items():
                    history.setdefault(key, []).append(value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}")
        if step >= total:
            break
    model.eval()
    return history


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """``loss_fn`` for classification: mean cross-entropy of ``model(x)`` against ``y``."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Fraction of rows of ``x`` whose argmax logit equals ``y`` (model in eval mode)."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum())
        for i in range(0, len(y), batch_size)
    )
    model.train(was_training)
    return correct / len(y)


def summary(values: Iterable[float]) -> dict[str, object]:
    """``{"mean", "std", "values"}`` of per-seed results (``std`` is the sample
    standard deviation; 0 for a single value)."""
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def paired(differences: Iterable[float]) -> dict[str, object]:
    """:func:`summary` of per-seed paired differences plus ``ci95``: the 95 % Student-t
    interval of their mean over seeds, ``mean +- t_{0.975, n-1} * std / sqrt(n)``
    (``[mean, mean]`` for a single seed, where no interval exists)."""
    out = summary(differences)
    n = len(out["values"])
    half = 0.0
    if n > 1:
        from scipy.stats import t

        half = float(t.ppf(0.975, n - 1)) * out["std"] / math.sqrt(n)
    out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def verdict(ci95: list[float], expected_sign: int) -> str:
    """``"agrees"`` if the interval lies wholly on the side ``expected_sign`` (+1 or -1)
    of zero, ``"disagrees"`` if wholly on the other side, else ``"not resolved"``."""
    lo, hi = ci95
    if lo > 0 or hi < 0:
        return "agrees" if (lo > 0) == (expected_sign > 0) else "disagrees"
    return "not resolved"


def arm_verdicts(results: dict[str, dict], expected: dict[str, int]) -> list[dict]:
    """The verdict of every compared arm against the identity arm, for :mod:`.cnn` and :mod:`.vit`.

    ``results`` is a :func:`entskip.experiments.compare.run` result's ``results``
    (setup -> mapping -> ``{"delta_vs_identity": ...}``), ``expected`` maps each judged
    mapping to the sign of the paired difference the claim predicts (+1 or -1); mappings
    missing from a setup are skipped.

    Returns ``[{"setup", "mapping", "expected_sign", "mean", "ci95", "verdict"}, ...]``,
    setups in order, then mappings in the order of ``expected``.
    """
    out = []
    for group, res in results.items():
        for mapping, sign in expected.items():
            if mapping in res:
                delta = res[mapping]["delta_vs_identity"]
                out.append({"setup": group, "mapping": mapping, "expected_sign": sign,
                            "mean": delta["mean"], "ci95": delta["ci95"], "verdict": verdict(delta["ci95"], sign)})
    return out


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm progress bar counting training epochs."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", disable=not enabled, dynamic_ncols=True)


def environment(settings: Settings, epochs: int, seeds: list[int]) -> dict[str, object]:
    """What a result depends on besides the hyperparameters: the run's settings, the
    versions and the backend."""
    return {
        "device": settings.device,
        "epochs": epochs,
        "seeds": seeds,
        "max_steps": settings.max_steps,
        "torch": torch.__version__,
        "entskip": entskip.__version__,
        "backend": entskip.get_backend(),
        "native_library": entskip.native_available(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def write_json(results: dict, path: Path) -> None:
    """Write ``results`` as indented JSON (dataclasses converted to dicts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
        f.write("\n")


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure as a PNG and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(nrows: int, ncols: int, width: float = 4.6, height: float = 3.6):
    """``(fig, [[axes of row 0], ...])``: a grid of panels drawn by the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, [list(row) for row in axes]


def bars(ax, groups: dict[str, dict], ylabel: str, title: str, reference: tuple[str, float] | None = None) -> None:
    """Bar chart of per-seed summaries: one bar per group at its mean, ``+-`` one
    standard deviation, and each seed's value as a dot; ``reference = (label, value)``
    adds a dashed horizontal line."""
    names = list(groups)
    means = [groups[k]["mean"] for k in names]
    stds = [groups[k]["std"] for k in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color="#9ab", edgecolor="#345")
    for i, k in enumerate(names):
        ax.plot([i] * len(groups[k]["values"]), groups[k]["values"], "o", color="#222", ms=3)
    lo = min(min(g["values"]) for g in groups.values())
    hi = max(max(g["values"]) for g in groups.values())
    if reference is not None:
        ax.axhline(reference[1], color="#c44", ls="--", lw=1, label=reference[0])
        ax.legend(fontsize=8)
        lo, hi = min(lo, reference[1]), max(hi, reference[1])
    pad = max(0.02, 0.15 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) if hi <= 1 else hi + pad)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def intervals(ax, groups: dict[str, dict], ylabel: str, title: str) -> None:
    """Each group's mean with its ``ci95`` as an error bar, seeds as dots, a line at 0."""
    names = list(groups)
    for i, k in enumerate(names):
        lo, hi = groups[k]["ci95"]
        mean = groups[k]["mean"]
        ax.errorbar([i], [mean], yerr=[[mean - lo], [hi - mean]], fmt="s", color="#345", capsize=5)
        ax.plot([i] * len(groups[k]["values"]), groups[k]["values"], "o", color="#999", ms=3)
    ax.axhline(0.0, color="#c44", ls="--", lw=1)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)


def curves(ax, runs: dict[str, list[list[float]]], ylabel: str, title: str) -> None:
    """Mean over seeds of a per-epoch metric, one line per group, shaded by the range."""
    for name, per_seed in runs.items():
        length = min(len(r) for r in per_seed)
        arr = np.array([r[:length] for r in per_seed])
        epochs = np.arange(1, length + 1)
        ax.plot(epochs, arr.mean(axis=0), label=name, marker="o" if length < 3 else None)
        ax.fill_between(epochs, arr.min(axis=0), arr.max(axis=0), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
