"""Whole-model training steps of ``python -m entskip.bench --timm-step`` / ``--resnet-step``.

Each times one SGD training step (forward, cross-entropy, backward, update) of a model as
it is and after :func:`entskip.entangle`, the two models alternating step by step so that a
shared machine's drift hits both alike. Reported: the medians in ms, every sample, and the
median of the per-round ratios (entangled / plain of the same round) with its spread.

- ``--timm-step``: timm ``vit_tiny_patch16_224``, batch 16, converted with
  ``entangle(model, mapping="identity", schedule="decay", alpha_min=0.8)`` (Zhang et al.'s
  decayed shortcut); the target is a ratio within 3 %.
- ``--resnet-step``: torchvision ``resnet18`` and ``resnet50``, batch 8, 224 x 224, in both
  memory formats (contiguous NCHW: entskip's features-first kernels; channels_last:
  features last), converted with ``entangle(model, "sparse", density=0.25, block=16)``.

Both need timm / torchvision, which import only beside a torch they were built for (the
CUDA-torch venv of ``make test-cuda-torch`` has both); without them the record says why.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

import entskip


def alternating_steps(models: dict[str, torch.nn.Module], images: torch.Tensor, labels: torch.Tensor,
                      steps: int, warmup: int) -> dict:
    """Times of ``steps`` training steps of each model (after ``warmup``), one step of each per round."""
    optims = {name: torch.optim.SGD(m.parameters(), lr=1e-3) for name, m in models.items()}

    def step(name):
        optims[name].zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(models[name](images), labels)
        loss.backward()
        optims[name].step()

    times = {name: [] for name in models}
    for i in range(warmup + steps):
        for name in models:
            t0 = time.perf_counter()
            step(name)
            if i >= warmup:
                times[name].append(1e3 * (time.perf_counter() - t0))
    ratios = [e / p for p, e in zip(times["plain"], times["entangled"])]
    return {
        "steps": steps, "warmup": warmup, "plain_ms": statistics.median(times["plain"]),
        "entangled_ms": statistics.median(times["entangled"]), "samples_ms": times,
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
    }


def _inputs(batch: int, size: int, memory_format=torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=gen).contiguous(memory_format=memory_format)
    return images, torch.randint(0, 1000, (batch,), generator=gen)


def _unavailable(err: Exception) -> dict:
    return {"status": "n/a", "reason": f"{type(err).__name__}: {err}"}


def timm_step(steps: int = 20, warmup: int = 3, batch: int = 16) -> dict:
    """The ViT-Ti step, plain and entangled (identity, decay to 0.8)."""
    try:
        import timm
    except Exception as err:  # timm needs torchvision, which may not import beside this torch
        return _unavailable(err)
    torch.manual_seed(0)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    entangled = entskip.entangle(copy.deepcopy(plain), mapping="identity", schedule="decay", alpha_min=0.8)
    images, labels = _inputs(batch, 224)
    rec = alternating_steps({"plain": plain, "entangled": entangled}, images, labels, steps, warmup)
    return {"status": "ok", "model": "vit_tiny_patch16_224", "batch": batch, "timm": timm.__version__, **rec,
            "target": {"max_ratio": 1.03, "met": rec["ratio"] <= 1.03}}


def resnet_steps(names=("resnet18", "resnet50"), steps: int = 5, warmup: int = 2, batch: int = 8,
                 size: int = 224) -> dict:
    """Per torchvision ResNet and memory format: the step plain and entangled (sparse 1/4, block 16)."""
    try:
        import torchvision
        from torchvision import models as tv_models
    except Exception as err:
        return _unavailable(err)
    records = []
    for name in names:
        for fmt_name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            torch.manual_seed(0)
            plain = getattr(tv_models, name)(weights=None).to(memory_format=fmt)
            entangled = entskip.entangle(copy.deepcopy(plain), "sparse", density=0.25, block=16)
            images, labels = _inputs(batch, size, fmt)
            rec = alternating_steps({"plain": plain, "entangled": entangled}, images, labels, steps, warmup)
            records.append({"model": name, "format": fmt_name, **rec})
    return {"status": "ok", "batch": batch, "size": size, "torchvision": torchvision.__version__,
            "mapping": {"name": "sparse", "density": 0.25, "block": 16}, "results": records}


def describe(rec: dict) -> str:
    """A printable summary of a step record, a line per model and format."""
    if rec["status"] != "ok":
        return f"n/a ({rec['reason']})"
    target = rec.get("target")  # a single-model record's
    verdict = "" if target is None else f"; {'met' if target['met'] else 'MISSED'} <= {target['max_ratio']}"
    lines = []
    for e in rec.get("results", [rec]):
        where = f"{e['model']}" + (f" {e['format']}" if "format" in e else "") + f", batch {rec['batch']}"
        lines.append(f"{where}: plain {e['plain_ms']:.1f} ms, entangled {e['entangled_ms']:.1f} ms, ratio "
                     f"{e['ratio']:.3f} (rounds {e['ratio_min']:.3f}-{e['ratio_max']:.3f}){verdict}")
    return "\n".join(lines)
