"""The roofline floor (docs/performance.md, "Roofline"), and the machine numbers it needs, measured in the run.

The floor of a case is ``max(bytes / bandwidth, flops / peak[dtype])`` with the
bytes and flops of :data:`FORMULAS`. ``bandwidth`` is the achieved bandwidth of a
device copy (the faster of a large one and a cache-sized one: the cases' tensors may
fit a large last-level cache), ``peak`` the rate of a large dense matmul in the dtype,
or in float32 for bfloat16 if that is faster (bfloat16 work can always run in
float32). Each is the fastest of a few calls: the machine's best, not its typical;
all are measured at the start of the run and stored with the results.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    "bandwidth": "fastest dst.copy_(src) of 256 MiB or 16 MiB buffers in the run, counted as read + write",
    "peak": (
        "fastest dense n x n @ n x n matmul of the dtype in the run (n = 2048 on CPU, 8192 on CUDA), 2*n^3 flops; "
        "for bfloat16 the float32 rate if that is higher"
    ),
}


@dataclass(frozen=True)
class Machine:
    """Achieved ``bandwidth`` (bytes/s) and ``peak`` matmul rate (flop/s) per dtype name."""

    bandwidth: float
    peak: dict[str, float]

    def as_dict(self) -> dict:
        return {
            "bandwidth_GBps": self.bandwidth / 1e9,
            "peak_TFLOPs": {dtype: p / 1e12 for dtype, p in self.peak.items()},
            "formulas": FORMULAS,
        }


def work(case: Case, density: float, role: str) -> tuple[float, float]:
    """``(bytes, flops)`` of a case at the mapping's actual ``density`` (``role`` ``floor``: ``x + r``)."""
    elt = torch.finfo(case.torch_dtype).bits // 8
    io = 3 * case.n * case.d * elt
    if role == "floor":
        return io, 0.0
    flops = 2 * case.n * case.d**2 * density
    return (2 * io, 3 * flops) if case.backward else (io, flops)


def floor_ms(case: Case, density: float, role: str, machine: Machine) -> float:
    """The roofline floor in ms: ``max(bytes / bandwidth, flops / peak)``."""
    nbytes, flops = work(case, density, role)
    return 1e3 * max(nbytes / machine.bandwidth, flops / machine.peak[case.dtype])


def _fastest_s(forward, device, settings: Settings) -> float:
    return min(samples_ms(Runner(forward), device, settings)) / 1e3


def _bandwidth(device: torch.device, settings: Settings) -> float:
    rates = []
    for nbytes in COPY_BYTES:
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        rates.append(2 * nbytes / _fastest_s(lambda: dst.copy_(src), device, settings))
    return max(rates)


def _peak(device: torch.device, dtype: torch.dtype, settings: Settings) -> float:
    n = MATMUL_SIZE.get(device.type, MATMUL_SIZE["cpu"])
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / _fastest_s(lambda: a @ b, device, settings)


def measure(device: torch.device, dtypes, settings: Settings) -> Machine:
    """Measure the copy bandwidth and the matmul peak of each dtype on ``device`` (5 calls each)."""
    device = torch.device(device)
    settings = Settings(5, settings.warmup, settings.budget_s)
    peak = {name: _peak(device, DTYPES[name], settings) for name in {*dtypes, "float32"}}
    if "bfloat16" in peak:
        peak["bfloat16"] = max(peak["bfloat16"], peak["float32"])
    return Machine(_bandwidth(device, settings), {name: peak[name] for name in dtypes})
