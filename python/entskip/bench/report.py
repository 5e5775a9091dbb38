"""What a run leaves behind: the table on stdout and the raw numbers as JSON.

The JSON holds the environment (machine, library versions, date, command), the
measured roofline numbers and their formulas, the timing settings, the methods and
one record per case and method (see :mod:`entskip.bench.sweep`).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from itertools import groupby
from pathlib import Path

import torch

import entskip

from . import heap
from .cases import density_label
from .roofline import Machine

SCHEMA = "entskip-bench/1"
_ENV_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MKL_", "ENTSKIP_", "TORCHINDUCTOR_", "CUDA_VISIBLE_DEVICES")


# The source tree: python/entskip/bench/report.py sits three folders below it.
REPO = Path(__file__).resolve().parents[3]

# The ISA features the CPU kernels are built for, as /proc/cpuinfo names them.
_CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "avx512_vp2intersect", "avx_vnni", "amx_bf16")


def _cpuinfo(key: str) -> str | None:
    """The value of /proc/cpuinfo's first ``key`` line, None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpu_flags() -> list[str] | None:
    flags = _cpuinfo("flags")
    if flags is None:
        return None
    have = set(flags.split())
    return [flag for flag in _CPU_FLAGS if flag in have]


def commit(repo: Path = REPO) -> str | None:
    """The source tree's git commit (with ``-dirty`` for uncommitted changes), None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                               text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """Machine (with its load average: other work skews CPU timings), threading
    environment variables, the heap's settings (:mod:`.heap`), library versions, source
    commit and date of this run."""
    machine = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine["gpu"] = props.name
        machine["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, "-m", "entskip.bench", *sys.argv[1:]],
        "device": str(device),
        "commit": commit(),
        "machine": machine,
        "environment_variables": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)},
        "malloc": heap.SETTINGS,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "entskip": entskip.__version__,
            "triton": _version("triton"),
            "numpy": _version("numpy"),
        },
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": SCHEMA, **payload}, indent=1) + "\n")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(records: list[dict], machine: Machine, backend: str) -> str:
    """The results as text: one section per (pass, dtype, N, D), one line per method."""
    lines = []
    w = max([17] + [len(r["label"]) + 1 for r in records])  # the method column fits every label
    columns = f"{'block':>5} {'density':>7}  {'method':<{w}}{'median ms':>10}{'vs x+r':>9}{'vs best peer':>14}{'% of floor':>12}"

    dtypes = list(dict.fromkeys(r["dtype"] for r in records))  # in the order they were run

    def section(rec):
        return rec["pass"], rec["dtype"], rec["n"], rec["d"]

    ordered = sorted(  # stable: the methods keep their order within a case
        records, key=lambda r: (r["pass"] != "forward", dtypes.index(r["dtype"]), r["n"], r["d"], r["block"], r["density"])
    )
    for (pass_name, dtype, n, d), recs in groupby(ordered, key=section):
        lines += [
            "",
            f"{pass_name}, {dtype}, N={n}, D={d}; entskip backend {backend}; floor from "
            f"{machine.bandwidth / 1e9:.1f} GB/s and {machine.peak[dtype] / 1e9:.1f} GFLOP/s",
            columns,
        ]
        for (block, density), case_recs in groupby(recs, key=lambda r: (r["block"], r["density"])):
            case_recs = list(case_recs)
            lead = f"{block:>5} {density_label(density):>7}"
            for rec in case_recs:
                if rec["status"] != "ok":
                    lines.append(f"{lead}  {rec['label']:<{w}}{'n/a':>10}  ({rec['reason']})")
                else:
                    lines.append(
                        f"{lead}  {rec['label']:<{w}}{rec['median_ms']:>10.3f}{_ratio(rec['vs_add']):>9}"
                        f"{_ratio(rec['vs_best_peer']):>14}{100 * rec['floor_fraction']:>11.1f}%"
                    )
                lead = " " * len(lead)
    return "\n".join(lines[1:])
