"""The PNG: median time vs density, one line per method, one panel per (pass, dtype) and D.

Methods whose time depends on the mapping's layout (entskip bsr, torch.sparse bsr)
get one line per block size (the first block of the run solid, the others dashed or
dotted); the dense methods one line; ``entskip dense`` is a point at density 1; the
roofline floor of the first block's mappings is the dotted black line. Both axes
are logarithmic.
"""

from __future__ import annotations

from pathlib import Path

from .cases import density_label

_STYLES = ("-", "--", ":", "-.")


def _series(records: list[dict], method: str, block: int) -> tuple[list[float], list[float]]:
    points = sorted(
        (r["density"], r["median_ms"])
        for r in records
        if r["method"] == method and r["block"] == block and r["status"] == "ok"
    )
    return [p[0] for p in points], [p[1] for p in points]


def _panel(ax, records: list[dict], blocks: list[int], methods: dict[str, tuple[str, bool]]) -> None:
    for color, (method, (name, sparse)) in enumerate(methods.items()):
        for i, block in enumerate(blocks if sparse else blocks[:1]):
            xs, ys = _series(records, method, block)
            if not xs:
                continue
            label = f"{name} b={block}" if sparse else name
            style = dict(marker="o" if len(xs) == 1 else ".", linestyle=_STYLES[i % len(_STYLES)])
            ax.plot(xs, ys, color=f"C{color}", label=label, **style)
    floor = sorted({(r["density"], r["floor_ms"]) for r in records if r["role"] != "floor" and r["block"] == blocks[0]})
    ax.plot([f[0] for f in floor], [f[1] for f in floor], color="black", linestyle=":", label=f"roofline floor b={blocks[0]}")
    densities = sorted({r["density"] for r in records})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(densities, [density_label(d) for d in densities])
    ax.tick_params(axis="x", which="minor", bottom=False, labelbottom=False)
    ax.grid(True, which="major", alpha=0.3)


def plot(records: list[dict], path: Path, title: str) -> None:
    """Draw the PNG to ``path`` (matplotlib with the non-interactive Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(dict.fromkeys((r["pass"], r["dtype"]) for r in sorted(records, key=lambda r: r["pass"] != "forward")))
    dims = sorted({r["d"] for r in records})
    blocks = list(dict.fromkeys(r["block"] for r in records))
    methods = {r["method"]: (r["label"], r["sparse"]) for r in records}  # in run order: stable colours
    width = max(8.0, 5.0 * len(dims))
    fig, axes = plt.subplots(len(rows), len(dims), figsize=(width, 3.6 * len(rows) + 1.2), squeeze=False, layout="constrained")
    for (pass_name, dtype), row in zip(rows, axes, strict=True):
        for d, ax in zip(dims, row, strict=True):
            panel = [r for r in records if (r["pass"], r["dtype"], r["d"]) == (pass_name, dtype, d)]
            _panel(ax, panel, blocks, methods)
            ax.set_title(f"{pass_name}, {dtype}, D={d}", fontsize=10)
            ax.set_xlabel("block density of M")
            ax.set_ylabel("median time (ms)")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=3 if width < 12 else 5, fontsize=9)
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
