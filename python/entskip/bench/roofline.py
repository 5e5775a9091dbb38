"""The roofline floor (docs/performance.md, "Roofline"), and the machine numbers it needs, measured in the run.

The floor of a case is ``max(bytes / bandwidth, flops / peak[dtype])`` with the
bytes and flops of :data:`FORMULAS`. :func:`measure` starts from the machine's own
numbers: ``bandwidth`` the achieved bandwidth of a device copy (the faster of a large
one and a cache-sized one: the cases' tensors may fit a large last-level cache),
``peak`` the rate of a large dense matmul in the dtype, or in float32 for bfloat16 if
that is faster (bfloat16 work can always run in float32). A floor that a method beats
is no floor, so :func:`best_of_run` then raises each to the best rate any method of the
run achieved (its bytes or flops over its fastest sample): no method's time is below
its floor, and no "% of floor" above 100. Each number is a fastest call, the machine's
best, not its typical; the JSON stores them with what set each (``sources``) and the
machine's own numbers (``machine_measured``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .cases import DTYPES, Case
from .peers import Runner
from .timing import Settings, samples_ms

COPY_BYTES = (256 * 2**20, 16 * 2**20)
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}

FORMULAS = {
    "forward": "bytes = 3*N*D*elt (read x and r, write y); flops = 2*N*D^2*density",
    "fwd+bwd": (
        "forward + backward. Backward: bytes = 3*N*D*elt (read g and x, write dx; dr = g is free), "
        "flops = 4*N*D^2*density (dx = alpha*g@M and dM = alpha*g^T@x on M's blocks, 2*N*D^2*density each). "
        "Total: bytes = 6*N*D*elt, flops = 6*N*D^2*density"
    ),
    "x + r": "its own floor: bytes = 3*N*D*elt, flops = 0, both passes (its backward hands g on: dx = dr = g)",
    "floor": "max(bytes / bandwidth, flops / peak[dtype]); fraction of floor = floor / median time",
    "density": "the mapping's actual block density (nnzb / (D/b)^2), for every method of the case",
    "bandwidth": (
        "the higher of the fastest dst.copy_(src) of 256 MiB or 16 MiB buffers (counted as read + write) and the "
        "best bytes / fastest sample of any method in the run; sources.bandwidth says which"
    ),
    "peak": (
        "per dtype, the higher of the fastest dense n x n @ n x n matmul (n = 2048 on CPU, 8192 on CUDA; 2*n^3 flops) "
        "and the best flops / fastest sample of any method of that dtype in the run; for bfloat16 the float32 rate if "
        "that is higher; sources.peak says which"
    ),
}


@dataclass(frozen=True)
class Machine:
    """Achieved ``bandwidth`` (bytes/s) and ``peak`` rate (flop/s) per dtype name, with what
    set each (``source``) and, once raised by :func:`best_of_run`, the machine's own numbers."""

    bandwidth: float
    peak: dict[str, float]
    source: dict = field(default_factory=dict)  # {"bandwidth": str, "peak": {dtype: str}}
    measured: "Machine | None" = None

    def as_dict(self) -> dict:
        own = self.measured or self
        return {
            "bandwidth_GBps": self.bandwidth / 1e9,
            "peak_TFLOPs": {dtype: p / 1e12 for dtype, p in self.peak.items()},
            "sources": self.source,
            "machine_measured": {
                "bandwidth_GBps": own.bandwidth / 1e9,
                "peak_TFLOPs": {dtype: p / 1e12 for dtype, p in own.peak.items()},
            },
            "formulas": FORMULAS,
        }


def _method_source(rec: dict) -> str:
    return (f"method {rec['label']} ({rec['pass']}, {rec['dtype']}, N={rec['n']}, D={rec['d']}, block {rec['block']}, "
            f"density {rec['density']:.4g})")


def best_of_run(machine: Machine, records: list[dict]) -> Machine:
    """``machine`` with its bandwidth and peaks raised to the best rates the timed
    ``records`` achieved (``bytes`` and ``flops`` over the fastest of ``samples_ms``)."""
    bandwidth, peak = machine.bandwidth, dict(machine.peak)
    source = {"bandwidth": machine.source.get("bandwidth", "machine"), "peak": dict(machine.source.get("peak", {}))}
    for rec in records:
        if rec["status"] != "ok":
            continue
        seconds = min(rec["samples_ms"]) / 1e3
        if rec["bytes"] / seconds > bandwidth:
            bandwidth, source["bandwidth"] = rec["bytes"] / seconds, _method_source(rec)
        if rec["dtype"] in peak and rec["flops"] / seconds > peak[rec["dtype"]]:
            peak[rec["dtype"]], source["peak"][rec["dtype"]] = rec["flops"] / seconds, _method_source(rec)
    if "bfloat16" in peak and "float32" in peak and peak["float32"] > peak["bfloat16"]:
        peak["bfloat16"], source["peak"]["bfloat16"] = peak["float32"], f"float32: {source['peak']['float32']}"
    return replace(machine, bandwidth=bandwidth, peak=peak, source=source, measured=machine.measured or machine)


def work(case: Case, density: float, role: str) -> tuple[float, float]:
    """``(bytes, flops)`` of a case at the mapping's actual ``density`` (``role`` ``floor``: ``x + r``)."""
    elt = torch.finfo(case.torch_dtype).bits // 8
    io = 3 * case.n * case.d * elt
    if role == "floor":
        return io, 0.0
    flops = 2 * case.n * case.d**2 * density
    return (2 * io, 3 * flops) if case.backward else (io, flops)


def floor_ms(nbytes: float, flops: float, dtype: str, machine: Machine) -> float:
    """The roofline floor in ms of ``nbytes`` and ``flops`` in ``dtype``: ``max(bytes / bandwidth, flops / peak)``."""
    return 1e3 * max(nbytes / machine.bandwidth, flops / machine.peak[dtype])


def _fastest_s(forward, device, settings: Settings) -> float:
    return min(samples_ms(Runner(forward), device, settings)) / 1e3


def _bandwidth(device: torch.device, settings: Settings) -> tuple[float, str]:
    rates = []
    for nbytes in COPY_BYTES:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        rates.append((2 * nbytes / _fastest_s(lambda: dst.copy_(src), device, settings), f"copy of {nbytes >> 20} MiB"))
    return max(rates)


def _peak(device: torch.device, dtype: torch.dtype, settings: Settings) -> float:
    n = MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"])
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / _fastest_s(lambda: a @ b, device, settings)


def measure(device: torch.device, dtypes, settings: Settings) -> Machine:
    """Measure the copy bandwidth and the matmul peak of each dtype on ``device`` (5 calls each)."""
    device = torch.device(device)
    settings = Settings(5, settings.warmup, settings.budget_s)
    n = MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"])
    peak = {name: _peak(device, DTYPES[name], settings) for name in {*dtypes, "float32"}}
    source = {name: f"{name} matmul n={n}" for name in peak}
    if "bfloat16" in peak and peak["float32"] > peak["bfloat16"]:
        peak["bfloat16"], source["bfloat16"] = peak["float32"], source["float32"]
    bandwidth, copy = _bandwidth(device, settings)
    return Machine(bandwidth, {name: peak[name] for name in dtypes},
                   {"bandwidth": copy, "peak": {name: source[name] for name in dtypes}})
