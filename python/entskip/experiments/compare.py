"""Train one classifier per skip mapping and seed, and compare them: the core of the
``cnn``, ``vit`` and ``rnn`` experiments (Lechner et al. 2022).

For each seed the data and the model's initial weights are the same for every
mapping (a paired comparison); only the skips differ. Each model's identity skips are
converted with :func:`entskip.entangle` (constant ``alpha = 1``; the mapping's
constructor gets ``seed = 1000 * seed`` and skip ``l`` uses ``seed + l``), and the
converted skips are measured with :mod:`entskip.analysis` (Jacobian norm and
eigenvalue moduli) before training.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

import entskip
from entskip import analysis, mappings

from .common import (
    Optim,
    Settings,
    accuracy,
    bars,
    cross_entropy,
    intervals,
    curves,
    environment,
    figure,
    paired,
    progress_bar,
    save_figure,
    seed_everything,
    summary,
    train,
)


@dataclass
class Setup:
    """One comparison: a model, the mappings to try, the data and the training budget.

    Attributes:
        build: returns a fresh, unconverted model (called after seeding).
        data: ``data(seed)`` -> ``{"x_train", "y_train", "x_test", "y_test"}`` tensors.
        mappings: mapping name -> constructor keywords (``density``, ``block``, ...).
        optim: optimiser settings.
        describe: what the model and the data are, for the JSON.
    """

    build: Callable[[], nn.Module]
    data: Callable[[int], dict[str, Tensor]]
    mappings: dict[str, dict]
    optim: Optim = field(default_factory=Optim)
    describe: dict = field(default_factory=dict)


def _skip_report(model: nn.Module) -> tuple[list[dict], list[list[float]]]:
    """Per-skip measurements, and the eigenvalues ``[re, im]`` of the last (deepest) skip.

    Returns ``([{"name", "kind", "dim", "alpha", "jacobian_norm", "eig_abs_min",
    "eig_abs_max", "rms_gain", "distance_from_identity"}, ...], [[re, im], ...])`` over every :class:`entskip.EntangledSkip`
    in ``model`` (projection shortcuts' skips included: they stay identities).
    """
    report, eig = [], None
    for name, skip in model.named_modules():
        if not isinstance(skip, entskip.EntangledSkip):
            continue
        eig = analysis.eigenvalue_spectrum(skip)
        report.append(
            {
                "name": name,
                "kind": skip.mapping.kind,
                "dim": skip.dim,
                "alpha": float(skip.alpha),
                "jacobian_norm": analysis.jacobian_norm(skip),
                "eig_abs_min": float(eig.abs().min()),
                "eig_abs_max": float(eig.abs().max()),
                **{k: skip.mapping.properties()[k] for k in ("rms_gain", "distance_from_identity")},
            }
        )
    return report, [[float(z.real), float(z.imag)] for z in eig]


def _convert(model: nn.Module, mapping: str, kwargs: dict, seed: int) -> nn.Module:
    if mapping == "identity":
        return model
    if "seed" in inspect.signature(mappings.MAPPINGS[mapping]).parameters:
        kwargs = {**kwargs, "seed": 1000 * seed}
    return entskip.entangle(model, mapping, "constant", **kwargs)


def compare(setup: Setup, settings: Settings, epochs: int, seeds: list[int], bar) -> dict[str, dict]:
    """Train ``setup.build()`` with each of ``setup.mappings`` for each seed.

    Returns, per mapping: ``test_acc`` and ``train_acc`` (:func:`summary` over seeds,
    after the last epoch), ``delta_vs_identity`` (:func:`paired` per-seed difference of
    test accuracy to the identity run, with its 95 % t-interval, when ``"identity"`` is
    among the mappings),
    ``history`` (``{"test_acc": [[per epoch] per seed], "loss": [...]}``), ``skips``
    and ``eigenvalues`` (:func:`_skip_report` of the first seed's model).
    """
    out: dict[str, dict] = {name: {"history": {"test_acc": [], "loss": []}, "test": [], "train": []} for name in setup.mappings}
    for seed in seeds:
        data = setup.data(seed)
        data = {k: v.to(settings.device) for k, v in data.items()}
        for name, kwargs in setup.mappings.items():
            generator = seed_everything(seed)
            model = _convert(setup.build(), name, kwargs, seed).to(settings.device)
            if seed == seeds[0]:
                out[name]["skips"], out[name]["eigenvalues"] = _skip_report(model)
            history = train(
                model,
                (data["x_train"], data["y_train"]),
                cross_entropy,
                epochs=epochs,
                optim=setup.optim,
                generator=generator,
                max_steps=settings.max_steps,
                bar=bar,
                evaluate=lambda m: {"test_acc": accuracy(m, data["x_test"], data["y_test"])},
            )
            out[name]["history"]["test_acc"].append(history["test_acc"])
            out[name]["history"]["loss"].append(history["loss"])
            out[name]["test"].append(history["test_acc"][-1])
            out[name]["train"].append(accuracy(model, data["x_train"], data["y_train"]))
    results = {}
    for name, r in out.items():
        results[name] = {"test_acc": summary(r["test"]), "train_acc": summary(r["train"])}
        if "identity" in out:
            results[name]["delta_vs_identity"] = paired(a - b for a, b in zip(r["test"], out["identity"]["test"]))
        results[name].update(history=r["history"], skips=r["skips"], eigenvalues=r["eigenvalues"])
    return results


def run(setups: dict[str, Setup], settings: Settings, epochs: int, seeds: int, desc: str) -> dict:
    """Run :func:`compare` for each named setup (one progress bar over all of them).

    ``epochs`` and ``seeds`` are the experiment's defaults, overridden by ``settings``.

    Returns:
        ``{"setups": {name: {"describe", "mappings", "optim"}}, "environment": ...,
        "results": {name: <compare() result>}}``.
    """
    epochs, seed_list = settings.resolved(epochs, seeds)
    total = epochs * len(seed_list) * sum(len(s.mappings) for s in setups.values())
    with progress_bar(total, desc, settings.progress) as pbar:
        results = {name: compare(s, settings, epochs, seed_list, pbar) for name, s in setups.items()}
    return {
        "setups": {name: {"describe": s.describe, "mappings": s.mappings, "optim": s.optim} for name, s in setups.items()},
        "environment": environment(settings, epochs, seed_list),
        "results": results,
    }


def plot(results: dict, path) -> None:
    """One row of :func:`plot_panels` per setup of a :func:`run` result, saved as a PNG."""
    groups = results["results"]
    fig, rows = figure(len(groups), 4)
    for axes, (name, group) in zip(rows, groups.items()):
        plot_panels(axes, group, name)
    save_figure(fig, path)


def plot_panels(axes, results: dict[str, dict], title: str) -> None:
    """Four panels for one comparison: final test accuracy per mapping (bars, seeds as
    dots), the paired difference to the identity with its 95 % interval, test accuracy
    over epochs, and the eigenvalues of the Jacobian of each mapping's last skip on the
    complex plane."""
    bars(axes[0], {k: v["test_acc"] for k, v in results.items()}, "test accuracy", f"{title}: final test accuracy")
    intervals(axes[1], {k: v["delta_vs_identity"] for k, v in results.items() if k != "identity"},
              "test accuracy - identity's", f"{title}: paired difference, 95 % CI")
    curves(axes[2], {k: v["history"]["test_acc"] for k, v in results.items()}, "test accuracy", f"{title}: test accuracy")
    theta = torch.linspace(0, 2 * torch.pi, 200)
    axes[3].plot(theta.cos(), theta.sin(), color="#bbb", lw=0.8)
    for name, r in results.items():
        eig = torch.tensor(r["eigenvalues"])
        axes[3].scatter(eig[:, 0], eig[:, 1], s=10, label=f"{name} (dim {len(eig)})", alpha=0.7)
    axes[3].set_aspect("equal")
    axes[3].set_xlabel("Re")
    axes[3].set_ylabel("Im")
    axes[3].set_title(f"{title}: last skip's Jacobian eigenvalues", fontsize=10)
    axes[3].legend(fontsize=7, loc="lower left")
