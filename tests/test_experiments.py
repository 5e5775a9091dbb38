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
from entskip import analysis, schedules  # noqa: E402
from entskip.experiments import EXPERIMENTS, Settings, common, images, mae, rnn, run_experiment  # noqa: E402
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
    assert written["verdicts"] and all(v["verdict"] in ("agrees", "disagrees", "not resolved") for v in written["verdicts"])
    if name == "mae":
        assert set(written["results"]) == set(mae.VARIANTS)
        for res in written["results"].values():
            assert 0 <= res["knn"]["mean"] <= 1 and 0 <= res["linear_probe"]["mean"] <= 1
            assert len(res["layers"]["effective_rank"]) == mae.DEPTH + 1
            assert len(res["history"]["loss"][0]) == 1
        assert set(written["paired"]) >= {"decayed_minus_standard", "decayed_minus_standard_no_skips"}
        assert written["setup"]["alpha_min"] == 0.7
        return
    for group in written["results"].values():
        for mapping, res in group.items():
            assert 0 <= res["test_acc"]["mean"] <= 1
            assert len(res["history"]["test_acc"][0]) == 1
            lo, hi = res["delta_vs_identity"]["ci95"]
            assert lo <= res["delta_vs_identity"]["mean"] <= hi
            for skip in res["skips"]:
                if skip["kind"] in ("identity", "orthogonal", "block_orthogonal"):
                    assert skip["jacobian_norm"] == pytest.approx(1.0, abs=1e-5)
                else:  # the defaults keep |eig| near 1 and the norm within [1, 1.25]
                    assert 1 - 1e-5 <= skip["jacobian_norm"] <= 1.25
                    assert skip["eig_abs_min"] >= 0.8 and skip["eig_abs_max"] <= 1.25
                    assert skip["distance_from_identity"] >= 0.1


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_image_comparisons_use_the_five_mappings(name, smoke_runs):
    written = smoke_runs[name][0]["results"]["cluttered_digits"]
    assert list(written) == ["identity", "orthogonal", "sparse", "block_orthogonal", "structural"]
    for mapping, res in written.items():
        projections = set() if name == "vit" else {"identity"}  # the ResNet's projection shortcuts stay identities
        assert {s["kind"] for s in res["skips"]} == {mapping} | projections
        if mapping in ("orthogonal", "identity", "block_orthogonal"):
            assert all(s["eig_abs_min"] == pytest.approx(1.0, abs=1e-5) for s in res["skips"])
    assert written["identity"]["delta_vs_identity"]["mean"] == 0.0
    if name == "vit":
        assert all(len(res["skips"]) == 8 for res in written.values())  # 4 blocks, attention and MLP skips


def test_paired_interval_and_verdict():
    out = common.paired([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["std"] == 1.0
    half = 4.302652729911275 / 3**0.5  # t_{0.975, 2} / sqrt(3)
    assert out["ci95"] == pytest.approx([2 - half, 2 + half], rel=1e-9)
    assert common.paired([0.5])["ci95"] == [0.5, 0.5]
    assert common.verdict([0.1, 0.2], +1) == "agrees" and common.verdict([0.1, 0.2], -1) == "disagrees"
    assert common.verdict([-0.2, -0.1], -1) == "agrees" and common.verdict([-0.1, 0.1], +1) == "not resolved"


def test_cluttered_digits_task():
    a = images.load(3, train_size=400, test_size=300)
    b = images.load(3, train_size=400, test_size=300)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x_train"], images.load(4, train_size=400, test_size=300)["x_train"])
    assert a["x_train"].shape == (400, 1, images.SIZE, images.SIZE) and a["x_test"].shape == (300, 1, images.SIZE, images.SIZE)
    assert a["y_train"].dtype == torch.int64 and set(a["y_train"].tolist()) == set(range(10))
    assert float(a["x_train"].mean()) == pytest.approx(0, abs=1e-5) and float(a["x_train"].std()) == pytest.approx(1, abs=1e-4)
    # Far from the ceiling for raw pixels (about 0.98 kNN on the plain 8x8 digits).
    knn = analysis.knn_accuracy(a["x_train"].flatten(1), a["y_train"], a["x_test"].flatten(1), a["y_test"])
    assert 0.15 < knn < 0.7


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


def _skips(model):
    return [m for m in model.modules() if isinstance(m, entskip.EntangledSkip)]


def test_mae_shapes_zero_init_and_decayed_schedule():
    images_ = torch.randn(3, 1, 16, 16)
    for variant in mae.VARIANTS:
        model = mae.build(variant)
        patches = model.patchify(images_)
        assert patches.shape == (3, 16, 16)
        torch.testing.assert_close(patches[0, 1], images_[0, 0, 0:4, 4:8].reshape(16))
        layers = model.features(images_)
        assert len(layers) == mae.DEPTH + 1 and all(f.shape == (3, 64) for f in layers)
        assert model(images_).dim() == 0
        # Zero-initialised branch outputs and head in every variant (Zhang et al.'s code: both arms).
        for block in [*model.encoder, *model.decoder]:
            for layer in (block.attn.proj, block.mlp.fc2):
                assert not layer.weight.any() and not layer.bias.any()
        assert not model.predict.weight.any() and not model.predict.bias.any()
        alphas = [float(m.alpha) for m in _skips(model.encoder)]
        if variant.startswith("decayed"):
            assert alphas == pytest.approx(schedules.decayed(mae.DEPTH, 0.7, per_sublayer=True), abs=1e-6)
        else:
            assert alphas == [1.0] * (2 * mae.DEPTH)
        assert all(float(m.alpha) == 1.0 for m in _skips(model.decoder))  # the decoder is never decayed
        if variant.endswith("_no_skips"):
            assert model.skips is None
        else:
            assert len(model.skips) == mae.DEPTH // 2 and model.skip_ids == [1, 3, 5]
            assert all(not s.fc2.weight.any() and not s.fc2.bias.any() for s in model.skips)


def test_mae_skip_layer_starts_as_identity_and_feeds_the_decoder():
    torch.manual_seed(0)
    layer = mae.SkipLayer(8, 12)
    x, encoded = torch.randn(2, 5, 8), torch.randn(2, 3, 12)
    ids_restore = torch.stack([torch.randperm(4), torch.randperm(4)])
    torch.testing.assert_close(layer(x, encoded, ids_restore), x)  # fc2 starts at zero
    nn_init = torch.nn.init
    nn_init.normal_(layer.fc2.weight)
    y = layer(x, encoded, ids_restore)
    assert not torch.allclose(y, x)
    encoded2 = encoded.clone()
    encoded2[:, 1:] += 1.0
    assert not torch.allclose(layer(x, encoded2, ids_restore), y)  # the visible tokens reach the decoder
    # Unshuffle: visible token j (after the class token) lands at the patch ids_shuffle[j].
    full = mae._unshuffle(encoded, layer.mask_token, ids_restore)
    ids_shuffle = ids_restore.argsort(dim=1)
    for n in range(2):
        for j in range(2):
            torch.testing.assert_close(full[n, 1 + ids_shuffle[n, j]], encoded[n, 1 + j])
        for j in range(2, 4):
            torch.testing.assert_close(full[n, 1 + ids_shuffle[n, j]], layer.mask_token[0, 0])


def test_mae_decoder_reads_the_encoder_only_through_the_skips():
    """With skips, the decoder starts from its position embeddings: the loss reaches the
    encoder only once the skip MLPs and the decoder's attention (which carries the visible
    tokens to the masked ones the loss is taken on) are non-zero."""
    torch.manual_seed(1)
    images_ = torch.randn(4, 1, 16, 16)

    def embed_grad(model):
        model.zero_grad()
        torch.manual_seed(2)
        model(images_).backward()
        return float(model.embed.weight.grad.abs().max())

    model = mae.build("standard")
    torch.nn.init.normal_(model.predict.weight)
    assert embed_grad(model) == 0.0  # skips start at zero
    for s in model.skips:
        torch.nn.init.normal_(s.fc2.weight)
    assert embed_grad(model) == 0.0  # the decoder's zero-initialised attention isolates masked tokens
    for block in model.decoder:
        torch.nn.init.normal_(block.attn.proj.weight)
    assert embed_grad(model) > 0.0
    with pytest.raises(ValueError, match="unknown variant"):
        mae.build("shallow")
