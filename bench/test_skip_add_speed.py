"""The harness's cases as pytest-benchmark microbenchmarks: ``pytest bench/``.

Every method of ``python -m entskip.bench`` (entskip's fused op, the eager expression,
``torch.addmm``, ``torch.sparse`` BSR, ``torch.compile``, ``x + r``) on the ``--quick``
grid (N = 2048, D = 1024, block 32, densities 1/8 and 1) in float32 and bfloat16,
forward and forward+backward. A peer that does not support a case is skipped with
the reason; an entskip failure fails. Each benchmark's ``extra_info`` holds the bytes,
flops and actual density of the roofline floor (see ``bench/README.md``). Benchmarks
of one case share a group, so ``pytest-benchmark`` compares them side by side.
"""

from __future__ import annotations

import pytest

from entskip.bench.cases import QUICK, grid
from entskip.bench.peers import METHODS, Unsupported
from entskip.bench.roofline import work
from entskip.bench.sweep import reason
from entskip.bench.timing import synchronized

CASES = grid(QUICK["n"], QUICK["dims"], QUICK["blocks"], QUICK["densities"], ("float32", "bfloat16"))
ROUNDS = 5


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.id)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_skip_add(benchmark, workloads, case, method):
    if not method.applies(case):
        pytest.skip(f"{method.label} runs at density 1 only")
    try:
        runner = method.build(case, workloads)
        runner.step()  # a peer may reject the dtype or device only when called
    except Exception as err:
        if method.role == "entskip" and not isinstance(err, Unsupported):
            raise
        pytest.skip(f"n/a: {reason(err)}")
    density = workloads.sparse(case).density
    nbytes, flops = work(case, density, method.role)
    benchmark.group = str(case)
    benchmark.extra_info.update(method=method.label, actual_density=density, bytes=nbytes, flops=flops)
    benchmark.pedantic(synchronized(runner, workloads.device), setup=runner.reset, rounds=ROUNDS, warmup_rounds=1)
