"""The benchmark grid: cases, default sizes, and the inputs and mappings the cases run on.

A :class:`Case` is one problem ``y = alpha * (x @ M^T) + r`` with ``x, r`` of shape
``N x D`` and ``M`` the entskip sparse mapping of block size ``b`` at a block density,
in one dtype, timed forward or forward+backward. :class:`Workloads` builds the
inputs and the mappings once and keeps them while the cases need them (a mapping
costs an ``O(D^3)`` eigen-solve to build: seconds at ``D = 4096``).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from fractions import Fraction

import torch

from entskip import mappings

ALPHA = 0.8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DENSITIES = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
BLOCKS = (32, 16, 64)  # 32 first: the block plotted as the main one
SIZES = {  # default N, dims and timed calls per measurement, per device type
    "cpu": {"n": 8192, "dims": (1024, 4096), "repeats": 10},
    "cuda": {"n": 16384, "dims": (1024, 4096, 8192), "repeats": 50},
}
QUICK = {"n": 2048, "dims": (1024,), "blocks": (32,), "densities": (1 / 8, 1.0), "dtypes": ("float32",), "repeats": 3}


def density_label(density: float) -> str:
    """``0.125 -> '1/8'``: the densities of the grid are read as fractions."""
    return str(Fraction(density).limit_denominator(1024))


def parse_density(text: str) -> float:
    """A density given as ``1/8``, ``0.125`` or ``1``, checked to lie in ``(0, 1]``."""
    value = float(Fraction(text))
    if not 0 < value <= 1:
        raise ValueError(f"density must be in (0, 1], got {text}")
    return value


@dataclass(frozen=True)
class Case:
    """One timed problem; ``backward`` times ``y = f(); y.backward(g)`` instead of ``f()``."""

    n: int
    d: int
    block: int
    density: float
    dtype: str
    backward: bool

    @property
    def pass_name(self) -> str:
        return "fwd+bwd" if self.backward else "forward"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def __str__(self) -> str:
        return f"{self.pass_name}-{self.dtype}-N{self.n}-D{self.d}-b{self.block}-d{density_label(self.density)}"


def grid(n: int, dims, blocks, densities, dtypes, backward: bool = True) -> list[Case]:
    """Every case of the grid, ordered so that one ``D`` (and one dtype) is finished before the next."""
    passes = (False, True) if backward else (False,)
    return [
        Case(n, d, b, density, dtype, bwd)
        for d, dtype, b, density, bwd in itertools.product(dims, dtypes, blocks, densities, passes)
    ]


@dataclass
class Inputs:
    """``x``, ``r`` and the backward's incoming gradient ``g`` (``N x D``), and ``alpha`` (0-d float32)."""

    x: torch.Tensor
    r: torch.Tensor
    g: torch.Tensor
    alpha: torch.Tensor


class Workloads:
    """Inputs and mappings of the cases on one device, built once and kept while in use.

    Float32 masters of the mappings live on the CPU until the grid moves to another
    ``D``; copies in the case's dtype and device, and the inputs, until it moves to
    another ``(N, D, dtype)``. Everything is seeded: a run is reproducible.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._masters: dict[tuple, mappings.Mapping] = {}
        self._copies: dict[tuple, mappings.Mapping] = {}
        self._inputs: dict[tuple, Inputs] = {}

    def _evict(self, case: Case) -> None:
        if any(key[0] != case.d for key in self._masters):
            self._masters.clear()
        group = (case.n, case.d, case.dtype)
        if any(key[:3] != group for key in (*self._copies, *self._inputs)):
            self._copies.clear()
            self._inputs.clear()

    def inputs(self, case: Case) -> Inputs:
        """Random ``x``, ``r``, ``g`` of the case's shape and dtype; ``alpha = ALPHA``."""
        self._evict(case)
        key = (case.n, case.d, case.dtype)
        if key not in self._inputs:
            gen = torch.Generator().manual_seed(0)
            x, r, g = (torch.randn(case.n, case.d, generator=gen) for _ in range(3))
            x, r, g = (t.to(self.device, case.torch_dtype) for t in (x, r, g))
            self._inputs[key] = Inputs(x, r, g, torch.tensor(ALPHA, device=self.device))
        return self._inputs[key]

    def _mapping(self, case: Case, kind: str, build) -> mappings.Mapping:
        self._evict(case)
        master_key = (case.d, kind) + ((case.block, case.density) if kind == "sparse" else ())
        key = (case.n, case.d, case.dtype) + master_key
        if key not in self._copies:
            if master_key not in self._masters:
                self._masters[master_key] = build()
            self._copies[key] = copy.deepcopy(self._masters[master_key]).to(self.device, case.torch_dtype)
        return self._copies[key]

    def sparse(self, case: Case) -> mappings.BlockSparseMapping:
        """``mappings.sparse(D, density, block, seed=0, construction="random")`` in the case's dtype, on
        the device: that construction stores exactly the requested blocks per row (the default
        unipotent one stores fewer, and only about half at density 1), so timings keep their density."""
        return self._mapping(
            case, "sparse", lambda: mappings.sparse(case.d, case.density, case.block, seed=0, construction="random")
        )

    def orthogonal(self, case: Case) -> mappings.DenseMapping:
        """``mappings.orthogonal(D, seed=0)`` (the dense path) in the case's dtype, on the device."""
        return self._mapping(case, "orthogonal", lambda: mappings.orthogonal(case.d, seed=0))
