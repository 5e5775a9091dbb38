"""The convolutional grid of ``python -m entskip.bench --conv`` (NCHW and channels_last maps).

``entskip.skip_add(x, M, r, alpha, feature_dim=1)`` on ``(N, C, H, W)`` maps of ResNet
stages, in both memory formats (``channels_last``: features last; contiguous ``NCHW``: the
ops' features-first format), beside

- ``conv1x1+r``: ``F.conv2d(x, M as a 1x1 weight) + r`` in the same memory format (the
  dense product a CNN would use for the mixing);
- ``x+r``: the plain residual, the floor.

Per case, dtype and pass the methods are timed interleaved call by call (so a shared
machine's drift hits each alike), with warm-up, and the medians kept. In forward+backward
``x``, ``r``, ``alpha`` and ``M`` (entskip's blocks or weight, the conv's weight) require
grad. The project's targets are checked on the medians: entskip on NCHW within 1.25x of
channels_last for the same case; entskip faster than ``conv1x1+r`` where ``M``'s density is
at most 1/4; a dense ``M`` no slower than ``conv1x1+r``.
"""

from __future__ import annotations

import operator
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import entskip
from entskip import mappings

from .peers import Runner
from .skips import interleaved_ms, runner

# (N, C, H, W), mapping constructor, its keywords.
CASES = (
    ((32, 64, 56, 56), "sparse", {"density": 0.25, "block": 16}),
    ((32, 64, 56, 56), "block_orthogonal", {"block": 16}),
    ((32, 256, 28, 28), "sparse", {"density": 0.25, "block": 32}),
    ((32, 256, 28, 28), "permutation", {}),
    ((32, 512, 14, 14), "block_orthogonal", {"block": 32}),
    ((32, 512, 14, 14), "orthogonal", {}),
    ((32, 1024, 14, 14), "block_orthogonal", {"block": 32}),  # ResNet-50 stage 3
    ((32, 1024, 14, 14), "sparse", {"density": 0.25, "block": 32}),
)
FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
ALPHA = 0.9
NCHW_LIMIT, SPARSE_LIMIT, DENSE_LIMIT = 1.25, 1.0, 1.0
LABELS = {"entskip": "entskip skip_add", "conv1x1+r": "conv2d(x, M 1x1) + r", "x+r": "x + r"}


def _mapping(name: str, channels: int, kwargs: dict) -> mappings.Mapping:
    """A learnable mapping with its matrix as a plain parameter (no parametrization in the
    timing); a permutation as it is (nothing to learn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 64 channels at density 1/4, block 16: one block per block row
        m = mappings.make(name, channels, seed=0, **kwargs)
    if isinstance(m, mappings.PermutationMapping):
        return m
    if isinstance(m, mappings.BlockSparseMapping):
        return mappings.BlockSparseMapping(m.layout, m.blocks.detach(), learnable=True)
    return mappings.DenseMapping(m.matrix().detach(), learnable=True)


def _runners(shape, mapping_name, kwargs, fmt, dtype, backward: bool) -> tuple[dict[str, Runner], float]:
    """Per method its Runner, and the mapping's density."""
    gen = torch.Generator().manual_seed(0)
    n, c, h, w = shape
    x, r = (torch.randn(*shape, generator=gen).to(dtype).contiguous(memory_format=fmt) for _ in range(2))
    m = _mapping(mapping_name, c, kwargs).to(dtype)
    weight = torch.nn.Parameter(m.matrix().detach().to(dtype).reshape(c, c, 1, 1).contiguous(memory_format=fmt))
    alpha = torch.tensor(ALPHA)
    params = tuple(m.parameters())  # M's blocks or weight, learnable (none for a permutation)
    methods = {
        "entskip": (lambda x, r, a, *_p: entskip.skip_add(x, m, r, a, feature_dim=1), (x, r, alpha, *params)),
        "conv1x1+r": (lambda x, r, wt: F.conv2d(x, wt) + r, (x, r, weight)),
        "x+r": (operator.add, (x, r)),
    }
    grad = torch.randn(*shape, generator=gen).to(dtype).contiguous(memory_format=fmt) if backward else None
    return {name: runner(compute, inputs, grad) for name, (compute, inputs) in methods.items()}, m.density


def _targets(records: list[dict]) -> None:
    """Adds ``target`` to the entskip records (in place)."""
    by_key = {(tuple(r["shape"]), r["mapping"], r["format"], r["dtype"], r["pass"], r["method"]): r for r in records}
    for r in records:
        if r["method"] != "entskip":
            continue
        key = (tuple(r["shape"]), r["mapping"], r["format"], r["dtype"], r["pass"])
        checks = []
        if r["format"] == "nchw":
            cl = by_key[(key[0], key[1], "channels_last", *key[3:], "entskip")]
            checks.append(("entskip channels_last", NCHW_LIMIT, r["median_ms"] / cl["median_ms"]))
        conv = r["median_ms"] / by_key[(*key, "conv1x1+r")]["median_ms"]
        if r["density"] == 1.0:
            checks.append(("conv1x1+r", DENSE_LIMIT, conv))
        elif r["density"] <= 0.25:
            checks.append(("conv1x1+r", SPARSE_LIMIT, conv))
        r["targets"] = [{"versus": v, "max_ratio": lim, "ratio": q, "met": q <= lim} for v, lim, q in checks]


def run_grid(dtypes, repeats: int, cases=CASES, batch: int | None = None, backward: bool = True) -> list[dict]:
    """One record per (case, memory format, dtype, pass, method); ``batch`` overrides the cases' N."""
    records = []
    for shape, mapping_name, kwargs in cases:
        shape = (batch or shape[0], *shape[1:])
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for bwd in (False, True) if backward else (False,):
                for fmt_name, fmt in FORMATS.items():
                    runners, density = _runners(shape, mapping_name, kwargs, fmt, dtype, bwd)
                    times = interleaved_ms(runners, repeats)
                    for name, t in times.items():
                        t_sorted = sorted(t)
                        records.append({
                            "method": name, "label": LABELS[name], "shape": list(shape), "mapping": mapping_name,
                            "mapping_kwargs": kwargs, "density": density, "format": fmt_name, "dtype": dtype_name,
                            "pass": "fwd+bwd" if bwd else "forward", "median_ms": t_sorted[len(t) // 2],
                            "samples_ms": t,
                        })
                    del runners
    _targets(records)
    return records


def table(records: list[dict]) -> str:
    lines = []
    keys = dict.fromkeys((tuple(r["shape"]), r["mapping"], r["dtype"], r["pass"]) for r in records)
    for shape, mapping, dtype, pass_name in keys:
        lines += ["", f"{pass_name}, {dtype}, {'x'.join(map(str, shape))}, {mapping}",
                  f"{'format':<15}{'method':<24}{'median ms':>10}  targets"]
        for r in records:
            if (tuple(r["shape"]), r["mapping"], r["dtype"], r["pass"]) != (shape, mapping, dtype, pass_name):
                continue
            targets = "; ".join(f"{t['ratio']:.2f}x of {t['versus']} <= {t['max_ratio']}: {'met' if t['met'] else 'MISSED'}"
                                for t in r.get("targets", ()))
            lines.append(f"{r['format']:<15}{r['label']:<24}{r['median_ms']:>10.3f}  {targets}")
    return "\n".join(lines[1:])


def plot(records: list[dict], path: Path, title: str) -> None:
    """Bars of the median times per case, one panel per (dtype, pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["dtype"], r["pass"]) for r in records))
    cases = list(dict.fromkeys((tuple(r["shape"]), r["mapping"]) for r in records))
    series = [(f, m) for f in FORMATS for m in LABELS]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.6 * len(cases)), 3.2 * len(panels)), squeeze=False)
    width = 0.8 / len(series)
    for ax, (dtype, pass_name) in zip(axes[:, 0], panels):
        for k, (fmt, method) in enumerate(series):
            values = [next((r["median_ms"] for r in records if (tuple(r["shape"]), r["mapping"]) == case
                            and (r["dtype"], r["pass"], r["format"], r["method"]) == (dtype, pass_name, fmt, method)),
                           0.0) for case in cases]
            ax.bar([i + k * width for i in range(len(cases))], values, width, label=f"{LABELS[method]} [{fmt}]",
                   hatch="//" if fmt == "nchw" else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels([f"{'x'.join(map(str, s))}\n{m}" for s, m in cases], fontsize=7)
        ax.set_ylabel("median ms")
        ax.set_title(f"{pass_name}, {dtype}", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
