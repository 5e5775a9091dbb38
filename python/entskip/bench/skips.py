"""The elementwise-skip grid of ``python -m entskip.bench --skips`` (and ``--timm-step``).

For each shape (``16x197x192``: a ViT-Ti block, ``8192x1024``, ``64x197x768``: a ViT-B
block), dtype and pass it times, interleaved call by call so that a shared machine's
drift hits every method alike:

- ``entskip identity``: ``entskip.skip_add(x, mappings.identity(D), r, alpha)``;
- ``entskip permutation``: ``entskip.skip_add(x, mappings.permutation(D), r, alpha)``;
- ``eager identity`` / ``eager permutation``: the unfused ``alpha * x + r`` and
  ``alpha * x[..., index] + r`` (what the mappings ran before the fused ops);
- ``torch.add``: ``torch.add(r, x, alpha=a)`` with a Python float ``a`` (no dalpha);
- ``x + r``: the plain residual, the floor.

``alpha`` is a 0-d float32 tensor like a module's; in forward+backward ``x``, ``r`` and
``alpha`` require grad (a learnable alpha; ``torch.add`` has none). The project's targets
are checked against the medians: identity forward within 1.2x of ``torch.add``, identity
fwd+bwd within 1.5x of ``x + r``'s, permutation forward within 1.5x and fwd+bwd within 2x
of ``x + r``'s.

``--timm-step`` (:mod:`.model_steps`) times a timm ViT-Ti training step plain and entangled.
"""

from __future__ import annotations

import operator
import random
import statistics
import time
from collections.abc import Callable

import torch

import entskip
from entskip import mappings

from .peers import Runner

SHAPES = ((16, 197, 192), (8192, 1024), (64, 197, 768))
ALPHA = 0.9
# (method, pass) -> (the method it is compared with, the largest ratio allowed)
TARGETS = {
    ("entskip-identity", "forward"): ("torch.add", 1.2),
    ("entskip-identity", "fwd+bwd"): ("x+r", 1.5),
    ("entskip-permutation", "forward"): ("x+r", 1.5),
    ("entskip-permutation", "fwd+bwd"): ("x+r", 2.0),
}
LABELS = {
    "entskip-identity": "entskip identity",
    "entskip-permutation": "entskip permutation",
    "eager-identity": "eager alpha*x + r",
    "eager-permutation": "eager alpha*x[..., idx] + r",
    "torch.add": "torch.add(r, x, alpha=a)",
    "x+r": "x + r",
}


def _methods(shape, dtype, device) -> dict[str, Callable[[], tuple[Callable, tuple]]]:
    """Per method: ``(compute, inputs)`` with ``compute(*inputs) -> y``."""
    gen = torch.Generator().manual_seed(0)
    x, r = (torch.randn(*shape, generator=gen).to(device, dtype) for _ in range(2))
    alpha = torch.tensor(ALPHA, device=device)
    d = shape[-1]
    identity = mappings.identity(d)
    perm = mappings.permutation(d, seed=0).to(device)
    index = perm.index
    return {
        "entskip-identity": (lambda x, r, a: entskip.skip_add(x, identity, r, a), (x, r, alpha)),
        "entskip-permutation": (lambda x, r, a: entskip.skip_add(x, perm, r, a), (x, r, alpha)),
        "eager-identity": (lambda x, r, a: a * x + r, (x, r, alpha)),
        "eager-permutation": (lambda x, r, a: a * x.index_select(-1, index) + r, (x, r, alpha)),
        "torch.add": (lambda x, r: torch.add(r, x, alpha=ALPHA), (x, r)),
        "x+r": (operator.add, (x, r)),
    }


def runner(compute, inputs, grad: torch.Tensor | None) -> Runner:
    """``compute(*inputs)`` timed forward, or with ``grad`` forward+backward: every input a
    fresh leaf that requires grad, a Parameter used as it is."""
    if grad is None:
        return Runner(lambda: compute(*inputs))
    leaves = tuple(t if isinstance(t, torch.nn.Parameter) else t.detach().clone().requires_grad_() for t in inputs)
    return Runner(lambda: compute(*leaves), leaves, grad)


def interleaved_ms(runners: dict[str, Runner], repeats: int, warmup: int = 5, warmup_s: float = 1.0,
                   seed: int = 0) -> dict[str, list[float]]:
    """Per-call times in ms, one call of each runner per round (CPU wall clock), each round
    in a fresh random order (seeded, so a run is repeatable). What a call finds (the caches
    its predecessor left, a fresh allocation's page faults, threads still spinning or gone
    to sleep) depends on the call before it; a fixed or rotated order would give every
    runner the same predecessor in every round. Untimed rounds come first, at least
    ``warmup`` of them and ``warmup_s`` seconds (a 0.1 ms call needs many to warm up; with 0.2 s,
    the first case of a run on an idle 2-vCPU VM once timed torch.add at 5x x + r)."""
    names = list(runners)
    order = random.Random(seed)

    def one_round(times=None):
        order.shuffle(names)
        for name in names:
            runner = runners[name]
            runner.reset()
            t0 = time.perf_counter()
            out = runner.step()
            if times is not None:
                times[name].append(1e3 * (time.perf_counter() - t0))
            del out

    start, rounds = time.perf_counter(), 0
    while rounds < warmup or time.perf_counter() - start < warmup_s:
        one_round()
        rounds += 1
    times = {name: [] for name in runners}
    for _ in range(repeats):
        one_round(times)
    return times


def run_grid(device: torch.device, dtypes, repeats: int, shapes=SHAPES, backward: bool = True) -> list[dict]:
    """One record per (shape, dtype, pass, method), with ratios and the targets checked."""
    records = []
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for bwd in (False, True) if backward else (False,):
                methods = _methods(shape, dtype, device)
                grad = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(device, dtype) if bwd else None
                runners = {name: runner(c, i, grad) for name, (c, i) in methods.items()}
                times = interleaved_ms(runners, repeats)
                medians = {name: statistics.median(t) for name, t in times.items()}
                pass_name = "fwd+bwd" if bwd else "forward"
                for name, t in times.items():
                    rec = {
                        "method": name, "label": LABELS[name], "shape": list(shape), "dtype": dtype_name,
                        "pass": pass_name, "median_ms": medians[name], "samples_ms": t,
                        "vs_add": medians[name] / medians["x+r"], "vs_torch_add": medians[name] / medians["torch.add"],
                    }
                    if (name, pass_name) in TARGETS:
                        peer, limit = TARGETS[(name, pass_name)]
                        ratio = medians[name] / medians[peer]
                        rec["target"] = {"versus": peer, "max_ratio": limit, "ratio": ratio, "met": ratio <= limit}
                    records.append(rec)
                del runners, methods
    return records


def table(records: list[dict]) -> str:
    lines = []
    for key in dict.fromkeys((tuple(r["shape"]), r["dtype"], r["pass"]) for r in records):
        lines += ["", f"{key[2]}, {key[1]}, {'x'.join(map(str, key[0]))}",
                  f"{'method':<30}{'median ms':>10}{'vs x+r':>9}{'vs torch.add':>14}  target"]
        for r in records:
            if (tuple(r["shape"]), r["dtype"], r["pass"]) != key:
                continue
            t = r.get("target")
            target = "" if t is None else f"{t['ratio']:.2f}x of {t['versus']} <= {t['max_ratio']}: {'met' if t['met'] else 'MISSED'}"
            lines.append(f"{r['label']:<30}{r['median_ms']:>10.3f}{r['vs_add']:>8.2f}x{r['vs_torch_add']:>13.2f}x  {target}")
    return "\n".join(lines[1:])
