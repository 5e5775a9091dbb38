"""Smoke test of the benchmark harness (``python -m entskip.bench``) on a tiny grid.

Runs ``main()`` in-process and checks that every method has a record with sane
numbers, that the table prints and that the JSON and PNG are written. The
``torch.compile`` peer runs with the ``aot_eager`` backend here: inductor's first
compile on a fresh machine probes the CPU's vector ISA by compiling test programs,
which takes tens of seconds on two cores, and the harness's plumbing, not inductor,
is under test.
"""

from __future__ import annotations

import functools
import json
import math
import platform

import pytest
import torch

import entskip
from entskip import bench
from entskip.bench.peers import METHODS


@pytest.fixture
def fast_compile(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_harness_times_every_method_and_writes_its_reports(tmp_path, capsys, fast_compile):
    argv = "--device cpu --n 64 --dims 64 --blocks 16 --densities 1 --dtypes float32 --repeats 2 --budget 1"
    path = bench.main([*argv.split(), "--out", str(tmp_path)])

    table = capsys.readouterr().out
    for heading in ("forward, float32, N=64, D=64", "fwd+bwd, float32, N=64, D=64", "median ms", "% of floor"):
        assert heading in table
    for method in METHODS:
        assert method.label in table

    data = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 0
    assert data["device"] == "cpu" and data["versions"]["torch"] == torch.__version__
    if platform.libc_ver()[0] == "glibc":  # freed memory kept in the heap, and recorded
        assert data["malloc"] == {"mallopt": {"M_MMAP_THRESHOLD": 1 << 30, "M_TRIM_THRESHOLD": 1 << 30}}
    assert _positive(data["roofline"]["bandwidth_GBps"]) and _positive(data["roofline"]["peak_TFLOPs"]["float32"])
    records = {(r["method"], r["pass"]): r for r in data["results"]}
    assert set(records) == {(m.id, p) for m in METHODS for p in ("forward", "fwd+bwd")}
    for (method, pass_name), rec in records.items():
        if (method, pass_name) == ("sparse-bsr", "fwd+bwd"):
            assert rec["status"] == "n/a" and rec["reason"] == "no autograd"
            continue
        assert rec["status"] == "ok", rec
        assert len(rec["samples_ms"]) == 2
        for key in ("median_ms", "floor_ms", "vs_add", "vs_best_peer", "floor_fraction", "bytes"):
            assert _positive(rec[key]), (method, pass_name, key, rec[key])
    assert records[("x+r", "forward")]["vs_add"] == 1.0


def test_several_backends_are_timed_side_by_side(tmp_path, capsys):
    argv = "--device cpu --n 64 --dims 64 --blocks 16 --densities 1/4 --dtypes float32 --repeats 2 --budget 1"
    path = bench.main([*argv.split(), "--methods", "entskip-bsr", "--backend", "cpu", "reference",
                       "--no-plot", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    assert "entskip bsr [cpu]" in table and "entskip bsr [reference]" in table
    data = json.loads(path.read_text())
    assert data["backend"] == {"requested": ["cpu", "reference"], "resolved": ["cpu", "reference"]}
    timed = {r["method"] for r in data["results"] if r["status"] == "ok"}
    assert {"entskip-bsr@cpu", "entskip-bsr@reference", "x+r"} <= timed


def test_skips_grid_times_every_method_and_checks_the_targets():
    from entskip.bench import skips

    records = skips.run_grid(torch.device("cpu"), ["float32"], repeats=2, shapes=((4, 32), (2, 3, 16)))
    assert {(r["method"], r["pass"]) for r in records} == {(m, p) for m in skips.LABELS for p in ("forward", "fwd+bwd")}
    assert len(records) == 2 * 2 * len(skips.LABELS)
    for rec in records:
        assert len(rec["samples_ms"]) == 2 and _positive(rec["median_ms"]) and _positive(rec["vs_add"])
        if (rec["method"], rec["pass"]) in skips.TARGETS:
            assert set(rec["target"]) == {"versus", "max_ratio", "ratio", "met"}
    assert "entskip permutation" in skips.table(records)


def test_conv_grid_times_both_formats_and_checks_the_targets(tmp_path):
    from entskip.bench import conv

    cases = (((2, 64, 3, 5), "sparse", {"density": 0.25, "block": 16}), ((1, 16, 2, 2), "orthogonal", {}),
             ((1, 8, 3, 3), "permutation", {}))
    records = conv.run_grid(["float32", "bfloat16"], repeats=2, cases=cases)
    assert len(records) == len(cases) * 2 * 2 * len(conv.FORMATS) * len(conv.LABELS)
    assert {(r["format"], r["method"], r["pass"], r["dtype"]) for r in records} == {
        (f, m, p, d) for f in conv.FORMATS for m in conv.LABELS for p in ("forward", "fwd+bwd")
        for d in ("float32", "bfloat16")}
    for rec in records:
        assert len(rec["samples_ms"]) == 2 and _positive(rec["median_ms"])
        if rec["method"] != "entskip":
            assert "targets" not in rec
            continue
        versus = {t["versus"] for t in rec["targets"]}
        assert versus == ({"conv1x1+r", "entskip channels_last"} if rec["format"] == "nchw" else {"conv1x1+r"})
        for t in rec["targets"]:
            assert t["met"] == (t["ratio"] <= t["max_ratio"])
    assert "conv2d(x, M 1x1) + r" in conv.table(records)
    pytest.importorskip("matplotlib")
    conv.plot(records, tmp_path / "conv.png", "smoke")
    assert (tmp_path / "conv.png").stat().st_size > 0


def test_alternating_steps_time_both_models_and_report_per_round_ratios():
    from entskip.bench import model_steps

    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1000))
    entangled = torch.nn.Sequential(torch.nn.Flatten(), entskip.EntangledResidual(torch.nn.Identity(), 192, alpha=0.9),
                                    torch.nn.Linear(3 * 8 * 8, 1000))
    images, labels = model_steps._inputs(2, 8)
    rec = model_steps.alternating_steps({"plain": plain, "entangled": entangled}, images, labels, steps=3, warmup=1)
    assert {len(v) for v in rec["samples_ms"].values()} == {3}
    assert all(_positive(rec[k]) for k in ("plain_ms", "entangled_ms", "ratio", "ratio_min", "ratio_max"))
    assert rec["ratio_min"] <= rec["ratio"] <= rec["ratio_max"]
    assert "plain" in model_steps.describe({"status": "ok", "batch": 2, "model": "toy", **rec})
    assert model_steps.describe({"status": "n/a", "reason": "no timm"}) == "n/a (no timm)"


def test_interleaved_rounds_shuffle_the_order_and_time_every_runner():
    from entskip.bench import peers, skips

    calls = []

    def runner(name):
        return peers.Runner(lambda: calls.append(name) or torch.zeros(1))

    times = skips.interleaved_ms({n: runner(n) for n in "abc"}, repeats=30, warmup=2, warmup_s=0.0)
    assert {n: len(t) for n, t in times.items()} == {"a": 30, "b": 30, "c": 30}
    assert all(t >= 0 for ts in times.values() for t in ts)
    assert len(calls) == 3 * 32  # two untimed rounds first
    predecessors = {n: {calls[i - 1] for i in range(1, len(calls)) if calls[i] == n} - {n} for n in "abc"}
    assert all(len(p) == 2 for p in predecessors.values()), predecessors  # each follows both others
