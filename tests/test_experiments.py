"""Smoke runs of ``python -m entskip.experiments``: one optimizer step per training run,
one seed, the files written; plus the pieces with a known answer (generated tasks, the
MAE's schedule)."""

import json

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import entskip  # noqa: E402
from entskip import schedules  # noqa: E402
from entskip.experiments import EXPERIMENTS, Settings, mae, rnn, run_experiment  # noqa: E402
from entskip.experiments.__main__ import main  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The smoke runs are tiny: one thread avoids OpenMP spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _smoke(tmp_path, **kwargs):
    return Settings(epochs=1, seeds=1, max_steps=1, out=tmp_path, progress=False, **kwargs)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory, one_thread):
    """``{name: (results, out folder)}``: each experiment run once with one step."""
    out = tmp_path_factory.mktemp("smoke")
    return {name: (run_experiment(name, _smoke(out)), out) for name in sorted(EXPERIMENTS)}


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_one_step_run_writes_json_and_png(name, smoke_runs):
    results, tmp_path = smoke_runs[name]
    written = json.loads((tmp_path / f"{name}.json").read_text())
    assert written["experiment"] == name and written["claim"]
    assert written["environment"]["epochs"] == 1 and written["environment"]["seeds"] == [0]
    assert written["environment"]["max_steps"] == 1
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written["results"] == json.loads(json.dumps(results["results"]))
    if name == "mae":
        assert set(written["results"]) == {"standard", "decayed"}
        for res in written["results"].values():
            assert 0 <= res["knn"]["mean"] <= 1 and 0 <= res["linear_probe"]["mean"] <= 1
            assert len(res["layers"]["effective_rank"]) == mae.DEPTH + 1
            assert len(res["history"]["loss"][0]) == 1
        return
    for group in written["results"].values():
        for res in group.values():
            assert 0 <= res["test_acc"]["mean"] <= 1
            assert len(res["history"]["test_acc"][0]) == 1
            assert all(s["jacobian_norm"] == pytest.approx(1.0, abs=1e-5) for s in res["skips"])


def test_comparison_skips_are_the_requested_mappings(smoke_runs):
    written = smoke_runs["vit"][0]["results"]["digits"]
    for mapping, res in written.items():
        assert {s["kind"] for s in res["skips"]} == {mapping}
        assert len(res["skips"]) == 8  # 4 blocks, attention and MLP skips
        if mapping in ("orthogonal", "identity"):
            assert all(s["eig_abs_min"] == pytest.approx(1.0, abs=1e-5) for s in res["skips"])
    assert written["identity"]["delta_vs_identity"]["mean"] == 0.0


def test_runs_are_deterministic_given_the_seed(tmp_path):
    first = run_experiment("rnn", Settings(epochs=1, seeds=1, max_steps=3, seed=5, out=tmp_path / "a", progress=False))
    second = run_experiment("rnn", Settings(epochs=1, seeds=1, max_steps=3, seed=5, out=tmp_path / "b", progress=False))
    other = run_experiment("rnn", Settings(epochs=1, seeds=1, max_steps=3, seed=6, out=tmp_path / "c", progress=False))
    assert first["results"] == second["results"]
    assert first["results"] != other["results"]


def test_command_line(tmp_path, capsys):
    main(["rnn", "--epochs", "1", "--seeds", "1", "--max-steps", "1", "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    out = capsys.readouterr().out
    assert "rnn:" in out and "time_variant" in out and "orthogonal" in out
    assert (tmp_path / "rnn.json").exists() and (tmp_path / "rnn.png").exists()
    with pytest.raises(SystemExit):
        main(["rnn", "--epochs", "0"])
    with pytest.raises(SystemExit):
        main(["nonsense"])


def test_unknown_experiment_raises(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment"):
        run_experiment("gan", _smoke(tmp_path))


def test_generated_tasks():
    g = torch.Generator().manual_seed(0)
    x, y = rnn.sequences("time_variant", 200, g)
    assert x.shape == (200, rnn.LENGTH, rnn.SYMBOLS) and torch.equal(x.sum(-1), torch.ones(200, rnn.LENGTH))
    assert torch.equal(y, x[:, rnn.LENGTH // 4].argmax(-1))
    x, y = rnn.sequences("time_invariant", 200, g)
    counts = x.sum(dim=1)
    assert torch.equal(y, counts.argmax(dim=1))
    # Time-invariant: reversing (or any reordering of) the steps keeps every label.
    assert torch.equal(x.flip(1).sum(dim=1).argmax(dim=1), y)
    with pytest.raises(ValueError, match="unknown task"):
        rnn.sequences("chaos", 1, g)


def test_mae_shapes_and_decayed_schedule():
    model = mae.build("standard")
    images = torch.randn(3, 1, 8, 8)
    patches = model.patchify(images)
    assert patches.shape == (3, 16, 4)
    torch.testing.assert_close(patches[0, 1], images[0, 0, 0:2, 2:4].reshape(4))
    layers, output = model.features(images)
    assert len(layers) == mae.DEPTH + 1 and all(f.shape == (3, 64) for f in layers) and output.shape == (3, 64)
    assert model(images).dim() == 0

    decayed = mae.build("decayed")
    alphas = [float(m.alpha) for m in decayed.encoder.modules() if isinstance(m, entskip.EntangledSkip)]
    assert alphas == pytest.approx(schedules.decayed(mae.DEPTH, mae.alpha_min(), per_sublayer=True), abs=1e-6)
    target = schedules.effective_alpha(schedules.decayed(12, 0.6, per_sublayer=True))
    assert schedules.effective_alpha(alphas) == pytest.approx(target, rel=1e-5)
    assert all(not b.attn.proj.weight.detach().any() for b in decayed.encoder)  # zero-initialised branches
    assert all(float(m.alpha) == 1.0 for m in model.modules() if isinstance(m, entskip.EntangledSkip))
