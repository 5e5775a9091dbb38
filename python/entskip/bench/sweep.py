"""Run the grid: time every method on every case, then compare each case's methods.

One record (a dict, stored as is in the JSON) per case and method. A method that
fails on a case, for any reason, gets ``status: "n/a"`` and the reason; the sweep
never stops on it. Methods whose time does not depend on the mapping's sparsity
(``Method.sparse`` false) are timed once per ``(N, D, dtype, pass)`` and their
record says ``shared: true`` for the other blocks and densities of the group.
"""

from __future__ import annotations

import statistics
import sys
from collections import defaultdict

import torch
from tqdm import tqdm

from .cases import Case, Workloads
from .peers import Method, Unsupported
from .roofline import Machine, best_of_run, floor_ms, work
from .timing import Settings, samples_ms


def reason(err: Exception) -> str:
    """The "n/a" text of a failure: an :class:`Unsupported` message, else the error's type and first line."""
    if isinstance(err, Unsupported):
        return str(err)
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}"[:200]


def measure(method: Method, case: Case, workloads: Workloads, settings: Settings) -> dict:
    """``{"status": "ok", "median_ms", "samples_ms"}`` or ``{"status": "n/a", "reason"}``."""
    try:
        times = samples_ms(method.build(case, workloads), workloads.device, settings)
    except Exception as err:  # an unsupported dtype/device/op is reported, never fatal
        if workloads.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"status": "n/a", "reason": reason(err)}
    return {"status": "ok", "median_ms": statistics.median(times), "samples_ms": times}


def _record(case: Case, method: Method, density: float, timing: dict, shared: bool) -> dict:
    nbytes, flops = work(case, density, method.role)
    return {
        "method": method.id,
        "label": method.label,
        "role": method.role,
        "sparse": method.sparse,
        "pass": case.pass_name,
        "dtype": case.dtype,
        "n": case.n,
        "d": case.d,
        "block": case.block,
        "density": case.density,
        "actual_density": density,
        **timing,
        "shared": shared,
        "bytes": nbytes,
        "flops": flops,
    }


def compare(records: list[dict]) -> None:
    """Add ``vs_add`` (time / ``x + r``), ``vs_best_peer`` (time / fastest peer, named in
    ``best_peer``) and ``floor_fraction`` (floor / time) to every timed record."""
    groups = defaultdict(list)
    for rec in records:
        groups[tuple(rec[k] for k in ("pass", "dtype", "n", "d", "block", "density"))].append(rec)
    for group in groups.values():
        ok = [r for r in group if r["status"] == "ok"]
        add = next((r["median_ms"] for r in ok if r["role"] == "floor"), None)
        peers = [r for r in ok if r["role"] == "peer"]
        best = min(peers, key=lambda r: r["median_ms"]) if peers else None
        for rec in ok:
            rec["vs_add"] = rec["median_ms"] / add if add else None
            rec["best_peer"] = best["method"] if best else None
            rec["vs_best_peer"] = rec["median_ms"] / best["median_ms"] if best else None
            rec["floor_fraction"] = rec["floor_ms"] / rec["median_ms"]


def sweep(
    cases: list[Case], methods: tuple[Method, ...], workloads: Workloads, machine: Machine, settings: Settings
) -> tuple[list[dict], Machine]:
    """Time every applicable ``(case, method)`` with a progress bar on stderr; the compared
    records, their floors (``floor_ms``) from ``machine`` raised to the run's best rates
    (:func:`entskip.bench.roofline.best_of_run`), and that machine."""
    jobs = [(case, method) for case in cases for method in methods if method.applies(case)]
    shared: dict[tuple, dict] = {}
    records = []
    with tqdm(total=len(jobs), desc="entskip.bench", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
        for case, method in jobs:
            bar.set_postfix_str(f"{case} {method.id}", refresh=False)
            key = (method.id, case.n, case.d, case.dtype, case.backward)
            reused = not method.sparse and key in shared
            timing = shared[key] if reused else measure(method, case, workloads, settings)
            if not method.sparse:
                shared[key] = timing
            density = workloads.sparse(case).density
            records.append(_record(case, method, density, timing, reused))
            bar.update()
    machine = best_of_run(machine, records)
    for rec in records:
        rec["floor_ms"] = floor_ms(rec["bytes"], rec["flops"], rec["dtype"], machine)
    compare(records)
    return records, machine
