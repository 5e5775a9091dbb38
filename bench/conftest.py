"""Fixtures of the pytest-benchmark microbenchmarks (``pytest bench/``; not part of ``make test``).

``ENTSKIP_BENCH_DEVICE`` picks the device (default: cuda if present, else cpu) and
``ENTSKIP_BACKEND`` the entskip backend, as for the library itself.
"""

from __future__ import annotations

import os

import pytest
import torch

from entskip.bench.cases import Workloads
from entskip.bench.peers import compile_limits


@pytest.fixture(scope="session")
def workloads():
    """Inputs and mappings shared by the benchmarks, on the benchmark device."""
    device = os.environ.get("ENTSKIP_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    with compile_limits():
        yield Workloads(torch.device(device))
