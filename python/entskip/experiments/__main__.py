"""``python -m entskip.experiments {cnn,vit,rnn,mae,all}``: see :mod:`entskip.experiments`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import EXPERIMENTS, Settings, run_experiment


def _headline(name: str, results: dict) -> list[str]:
    """One line per compared configuration: its main metric, mean +- std over seeds."""
    lines = []
    for group, res in results["results"].items():
        if name == "mae":
            lines.append(
                f"  {group:<12} kNN {res['knn']['mean']:.3f} +- {res['knn']['std']:.3f}   "
                f"linear probe {res['linear_probe']['mean']:.3f} +- {res['linear_probe']['std']:.3f}   "
                f"effective rank (last layer) {res['layers']['effective_rank'][-1]['mean']:.2f}"
            )
            continue
        for mapping, r in res.items():
            acc = r["test_acc"]
            lines.append(f"  {group:<15} {mapping:<11} test accuracy {acc['mean']:.3f} +- {acc['std']:.3f}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m entskip.experiments", description="Small-scale reproductions of the entangled-skip papers."
    )
    parser.add_argument("name", choices=[*EXPERIMENTS, "all"], help="experiment to run ('all': each in turn)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs per run (default: the experiment's)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; runs use seed, seed + 1, ... (default: 0)")
    parser.add_argument("--seeds", type=int, default=None, help="runs per configuration (default: the experiment's, 5)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"), help="output folder")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each training run after this many steps")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads (default: 1; the models are too small to gain from more, and on a busy "
        "machine OpenMP's waiting makes more threads far slower)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    for value, flag in ((args.epochs, "--epochs"), (args.seeds, "--seeds"), (args.max_steps, "--max-steps"), (args.threads, "--threads")):
        if value is not None and value < 1:
            parser.error(f"{flag} must be at least 1")
    torch.set_num_threads(args.threads)
    settings = Settings(
        device=args.device, epochs=args.epochs, seed=args.seed, seeds=args.seeds, out=args.out,
        max_steps=args.max_steps, progress=not args.no_progress,
    )
    for name in EXPERIMENTS if args.name == "all" else [args.name]:
        results = run_experiment(name, settings)
        print(f"{name}: {results['elapsed_s']:.0f} s -> {settings.out / (name + '.json')}, {settings.out / (name + '.png')}")
        print("\n".join(_headline(name, results)))


if __name__ == "__main__":
    main()
