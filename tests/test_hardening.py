"""Hardening, second round (issue 15, and issue 14's item e): one regression test per finding.

Each test below failed on the code before its fix: an out-of-bounds read in the native layout
check, mappings / layouts / alpha on another device than ``x`` (a meta tensor made the
dispatcher run a fake kernel and return its uninitialised output), partial and hostile
``state_dict`` loads, alpha that overflows the compute dtype, layout buffers edited in place,
unclear messages, a 0-d learnable alpha (FSDP2 rejects it), a roofline floor that methods beat,
and a blocking ``torch.tensor(alpha, device=...)`` on every call.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import entskip
from entskip import BlockLayout, gpu_dispatch, mappings
from entskip.bench import report, roofline, sweep

from conftest import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # sparse BSR beta / invariant-check warnings

BACKENDS = ["cpu", "reference"]


def _sparse(dim=64, block=16, **kw):
    return mappings.sparse(dim, density=0.5, block=block, dtype=torch.float64, **kw)


# ---------------------------------------------------------------------------------------------
# 1. The native layout check reads every offset before the indices it guards
# ---------------------------------------------------------------------------------------------


def test_native_check_rejects_a_middle_offset_past_the_blocks_without_reading_beyond():
    """crow = [0, 10, 4] with 4 blocks: the old check read col_indices[4..9] (heap beyond the
    tensor; ASan: heap-buffer-overflow) and printed what it found there."""
    b, x = 8, torch.randn(3, 16, dtype=torch.float64)
    values, alpha = torch.randn(4, b, b, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    crow, col = torch.tensor([0, 10, 4]), torch.tensor([0, 1, 0, 1])
    ccol, row, perm = torch.tensor([0, 2, 4]), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 2, 1, 3])
    with pytest.raises(RuntimeError, match=r"crow_indices must be non-decreasing, but entry 2 \(4\) < entry 1 \(10\)"):
        torch.ops.entskip.bsr_skip_add(x, values, crow, col, ccol, row, perm, alpha, None)
    grad = torch.randn(3, 16, dtype=torch.float64)
    good_crow, bad_ccol = torch.tensor([0, 2, 4]), torch.tensor([0, 10, 4])
    with pytest.raises(RuntimeError, match="ccol_indices must be non-decreasing"):
        torch.ops.entskip.bsr_skip_add_backward(grad, x, values, good_crow, col, bad_ccol, row, perm, alpha,
                                                [True, False, False])


# ---------------------------------------------------------------------------------------------
# 2. Every tensor argument on x's device; a fake kernel's output is never returned
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_meta_dense_mapping_raises_naming_it(backend):
    x, r = torch.randn(4, 64), torch.zeros(4, 64)
    with entskip.use_backend(backend), pytest.raises(ValueError, match="mapping is on meta but x is on cpu"):
        entskip.skip_add(x, torch.randn(64, 64, device="meta"), r, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_meta_bsr_mapping_raises_naming_it(backend):
    layout = BlockLayout(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), 16, (32, 32))
    bsr = layout.to_sparse_bsr(torch.randn(2, 16, 16)).to("meta")
    with entskip.use_backend(backend), pytest.raises(ValueError, match="mapping is on meta but x is on cpu"):
        entskip.skip_add(torch.randn(4, 32), bsr, None, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["orthogonal", "block_orthogonal", "permutation", "sparse", "structural"])
def test_a_mapping_moved_to_meta_raises_naming_its_tensor(kind, backend):
    kw = {} if kind in ("orthogonal", "permutation") else {"block": 16}
    mapping = mappings.make(kind, 64, **kw).to("meta")
    with entskip.use_backend(backend), pytest.raises(ValueError, match=r"mapping\.\w+ is on meta but x is on cpu"):
        entskip.skip_add(torch.randn(4, 64), mapping, torch.zeros(4, 64), 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_on_another_device_raises_naming_it(backend):
    with entskip.use_backend(backend), pytest.raises(ValueError, match="alpha is on meta but x is on cpu"):
        entskip.skip_add(torch.randn(4, 64), None, None, torch.tensor(0.5, device="meta"))


def test_direct_op_calls_with_a_meta_argument_do_not_return_the_fake_output():
    """The dispatcher picks the Meta kernel when any argument is a meta tensor."""
    x, alpha = torch.randn(4, 32), torch.tensor(0.5)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        torch.ops.entskip.dense_skip_add(x, torch.randn(32, 32, device="meta"), alpha, None)
    with pytest.raises(ValueError, match="alpha is on meta but x is on cpu"):
        torch.ops.entskip.dense_skip_add(x, torch.randn(32, 32), alpha.to("meta"), None)
    layout = BlockLayout(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), 16, (32, 32))
    with pytest.raises(ValueError, match="values is on meta but x is on cpu"):
        torch.ops.entskip.bsr_skip_add(x, torch.randn(2, 16, 16, device="meta"), *layout.tensors(), alpha, None)
    with pytest.raises(ValueError, match="grad is on meta but x is on cpu"):
        torch.ops.entskip.bsr_skip_add_backward(torch.randn(4, 32, device="meta"), x, torch.randn(2, 16, 16),
                                                *layout.tensors(), alpha, [True, True, True])


def test_all_meta_inputs_still_give_meta_shapes():
    """The control: the fake kernels still serve an all-meta call (shape inference)."""
    x, w = torch.randn(4, 32, device="meta"), torch.randn(16, 32, device="meta")
    y = torch.ops.entskip.dense_skip_add(x, w, torch.tensor(0.5, device="meta"), None)
    assert y.device.type == "meta" and y.shape == (4, 16)


# ---------------------------------------------------------------------------------------------
# 3, 5. load_state_dict checks what the constructors check, whichever keys it holds
# ---------------------------------------------------------------------------------------------


def _duplicate_column(mapping):
    """(crow, col) of ``mapping`` with one row's second block moved onto its first block's column."""
    crow, col = mapping.crow_indices.clone(), mapping.col_indices.clone()
    row = int(torch.nonzero(crow.diff() >= 2)[0])
    col[crow[row] + 1] = col[crow[row]]
    return crow, col


@pytest.mark.parametrize("given", ["col_indices", "crow_indices"])
def test_partial_state_dict_is_validated_as_it_will_be_after_the_load(given):
    mapping = _sparse()
    state = mapping.state_dict()
    if given == "col_indices":
        _, col = _duplicate_column(mapping)
        partial = {"blocks": state["blocks"], "col_indices": col}
    else:  # a crow whose rows no longer match the current (sorted) col_indices
        crow = mapping.crow_indices.clone()
        crow[1:-1] = crow[1:-1] + 1
        partial = {"blocks": state["blocks"], "crow_indices": crow}
    before = {k: v.clone() for k, v in mapping.state_dict().items()}
    with pytest.raises(ValueError, match="invalid block layout in state_dict"):
        mapping.load_state_dict(partial, strict=False)
    for key, value in mapping.state_dict().items():  # nothing was replaced
        assert torch.equal(value, before[key]), key


def test_partial_state_dict_that_is_valid_loads():
    mapping, other = _sparse(seed=0), _sparse(seed=1)
    state = other.state_dict()
    mapping.load_state_dict({"blocks": state["blocks"], "col_indices": state["col_indices"], "crow_indices":
                             state["crow_indices"]}, strict=False)
    x = torch.randn(3, 64, dtype=torch.float64)
    assert_close(entskip.skip_add(x, mapping), entskip.skip_add(x, other), torch.float64)


@pytest.mark.parametrize("index", [[0, 0, 2, 3], [0, 1, 2, 4], [0, 1, 2], [[0, 1], [2, 3]]],
                         ids=["duplicate", "out_of_range", "short", "2d"])
def test_permutation_load_state_dict_checks_what_the_constructor_checks(index):
    index = torch.tensor(index)
    if index.dim() != 1 or index.numel() == 4:  # [0, 1, 2] is a permutation, of 3 entries
        with pytest.raises(ValueError, match="index"):
            mappings.PermutationMapping(index)
    mapping = mappings.permutation(4)
    with pytest.raises(ValueError, match="state_dict .index. must be"):
        mapping.load_state_dict({"index": index})


def test_dense_mapping_load_state_dict_rejects_another_shape():
    """The dense mapping's constructor checks only the shape; torch's load checks it (size mismatch)."""
    mapping = mappings.orthogonal(8)
    with pytest.raises(RuntimeError, match="size mismatch"):
        mapping.load_state_dict({"weight": torch.randn(8, 4)})


# ---------------------------------------------------------------------------------------------
# 4. alpha finite in the compute dtype
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [1e39, -1e39, 10**400], ids=["1e39", "-1e39", "int_10e400"])
def test_alpha_that_overflows_float32_names_the_value_and_the_dtype(alpha, backend):
    x = torch.randn(4, 64)
    with entskip.use_backend(backend), pytest.raises(ValueError, match=r"finite in torch\.float32") as err:
        entskip.skip_add(x, _sparse().float(), None, alpha)
    assert (repr(alpha) if isinstance(alpha, int) else "e+39") in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_float64_tensor_alpha_that_overflows_float32_is_rejected(backend):
    x = torch.randn(4, 64)
    with entskip.use_backend(backend), pytest.raises(ValueError, match=r"finite in torch\.float32.*1e\+39"):
        entskip.skip_add(x, _sparse().float(), None, torch.tensor(1e39, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_finite_in_the_compute_dtype_is_accepted(backend):
    """Controls: 1e39 is fine for float64 x; the largest float32 passes for float32 x."""
    x64, m = torch.randn(4, 64, dtype=torch.float64), _sparse()
    with entskip.use_backend(backend):
        y = entskip.skip_add(x64, m, None, 1e39)
        assert torch.isfinite(y).all()
        big = float(torch.finfo(torch.float32).max)
        assert torch.isfinite(entskip.skip_add(torch.randn(2, 64) * 1e-30, None, None, big)).all()


# ---------------------------------------------------------------------------------------------
# 6. A layout's validation is tied to its tensors' versions, on every backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("buffer", ["col_indices", "crow_indices", "perm"])
def test_in_place_edit_of_a_layout_buffer_is_caught_before_the_next_call(buffer, backend):
    mapping, x = _sparse(), torch.randn(3, 64, dtype=torch.float64)
    with entskip.use_backend(backend):
        expected = entskip.skip_add(x, mapping)
        saved = getattr(mapping, buffer).clone()
        if buffer == "col_indices":
            mapping.col_indices.copy_(_duplicate_column(mapping)[1])
        elif buffer == "crow_indices":
            mapping.crow_indices[1] += 1
        else:
            mapping.perm.copy_(mapping.perm.flip(0))
        with pytest.raises(ValueError, match="the mapping's layout is invalid"):
            entskip.skip_add(x, mapping)
        getattr(mapping, buffer).copy_(saved)  # put back: valid again
        assert torch.equal(entskip.skip_add(x, mapping), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_edit_of_a_permutation_index_is_caught(backend):
    mapping = mappings.permutation(8).double()
    x = torch.randn(2, 8, dtype=torch.float64)
    with entskip.use_backend(backend):
        entskip.skip_add(x, mapping)
        mapping.index[0] = mapping.index[1]
        with pytest.raises(ValueError, match="permutation"):
            entskip.skip_add(x, mapping)


def test_gpu_layout_validation_follows_versions_and_data_swaps():
    layout = BlockLayout(torch.tensor([0, 2, 3]), torch.tensor([0, 1, 1]), 4, (8, 8))
    tensors = layout.tensors()
    gpu_dispatch.validate_layout(*tensors, 4)
    tensors[1][1] = 0  # a duplicate column
    with pytest.raises(ValueError, match="duplicate"):
        gpu_dispatch.validate_layout(*tensors, 4)
    tensors[1][1] = 1
    gpu_dispatch.validate_layout(*tensors, 4)
    tensors[1].data = torch.tensor([1, 0, 1])  # no version bump, but another tensor's memory
    with pytest.raises(ValueError, match="sorted"):
        gpu_dispatch.validate_layout(*tensors, 4)


def test_layouts_made_under_inference_mode_validate():
    """Inference tensors have no version counter (reading ``_version`` raised RuntimeError)."""
    with torch.inference_mode():
        layout = BlockLayout(torch.tensor([0, 2, 3]), torch.tensor([0, 1, 1]), 4, (8, 8))
        mapping = _sparse()
    gpu_dispatch.validate_layout(*layout.tensors(), 4)
    with torch.inference_mode():
        x = torch.randn(3, 64, dtype=torch.float64)
        for backend in BACKENDS:
            with entskip.use_backend(backend):
                entskip.skip_add(x, mapping)


# ---------------------------------------------------------------------------------------------
# 7. Clear messages of the documented type
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_get_clear_messages(backend):
    x = torch.randn(2, 32)
    crow, col = torch.tensor([0, 1, 2]), torch.tensor([0, 1])
    with entskip.use_backend(backend):
        with pytest.raises(TypeError, match="feature_dim must be an int, got 1.0"):
            entskip.skip_add(x, None, None, 0.5, feature_dim=1.0)
        with pytest.raises(ValueError, match="alpha is on meta"):
            entskip.skip_add(x, None, None, torch.tensor(0.5, device="meta"))
        non_square = torch.sparse_bsr_tensor(crow, col, torch.randn(2, 16, 8), (32, 16), check_invariants=False)
        with pytest.raises(ValueError, match=r"blocks must be square \(b x b\), got 16 x 8"):
            entskip.skip_add(torch.randn(2, 16), non_square)
        hybrid = torch.sparse_bsr_tensor(crow, col, torch.randn(2, 16, 16, 3), (32, 32, 3))
        with pytest.raises(ValueError, match="hybrid BSR tensors are not supported"):
            entskip.skip_add(x, hybrid)
        with pytest.raises(ValueError, match="alpha must be finite"):
            entskip.skip_add(x, None, None, torch.tensor(math.nan))


# ---------------------------------------------------------------------------------------------
# 8. alpha stored with shape (1,); old 0-d checkpoints load
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learnable", [True, False])
def test_alpha_is_stored_with_shape_1_and_old_0d_checkpoints_load(learnable):
    skip = entskip.EntangledSkip(32, "orthogonal", alpha=0.3, learnable_alpha=learnable)
    assert skip.alpha.shape == (1,)
    old = {**skip.state_dict(), "alpha": torch.tensor(0.55)}  # as saved before: 0-d
    skip.load_state_dict(old)
    assert skip.alpha.shape == (1,) and float(skip.alpha) == pytest.approx(0.55)
    assert isinstance(skip.alpha, torch.nn.Parameter) == learnable
    x = torch.randn(3, 32, requires_grad=True)
    y = skip(x, torch.zeros(3, 32))
    assert_close(y, 0.55 * (x @ skip.mapping.matrix().mT), torch.float32)
    if learnable:
        y.sum().backward()
        assert skip.alpha.grad.shape == (1,)


# ---------------------------------------------------------------------------------------------
# 9. The roofline floor is never beaten
# ---------------------------------------------------------------------------------------------


def _records():
    """Two timed methods of one case: the first beats a too-slow machine's floor."""
    base = {"status": "ok", "role": "entskip", "label": "entskip bsr", "pass": "forward", "dtype": "float32",
            "n": 8192, "d": 1024, "block": 32, "density": 0.125, "sparse": True}
    fast = {**base, "method": "fast", "samples_ms": [1.0, 1.2, 1.5], "median_ms": 1.2, "bytes": 1e8, "flops": 4e9}
    floor = {**base, "method": "x+r", "label": "x + r", "role": "floor", "samples_ms": [2.0, 2.0],
             "median_ms": 2.0, "bytes": 1e8, "flops": 0.0}
    return [fast, floor]


def test_best_of_run_raises_the_machine_to_what_a_method_achieved():
    slow = roofline.Machine(1e9, {"float32": 1e9}, {"bandwidth": "copy of 256 MiB", "peak": {"float32": "matmul"}})
    machine = roofline.best_of_run(slow, _records())
    assert machine.bandwidth == pytest.approx(1e8 / 1e-3) and machine.peak["float32"] == pytest.approx(4e9 / 1e-3)
    assert machine.source["bandwidth"].startswith("method entskip bsr") and "N=8192" in machine.source["peak"]["float32"]
    data = machine.as_dict()
    assert data["machine_measured"] == {"bandwidth_GBps": 1.0, "peak_TFLOPs": {"float32": 1e-3}}
    assert data["sources"]["peak"]["float32"].startswith("method")
    quick = roofline.Machine(1e15, {"float32": 1e18}, {"bandwidth": "copy of 16 MiB", "peak": {"float32": "matmul"}})
    assert roofline.best_of_run(quick, _records()).source == quick.source  # the machine's numbers stand


def test_no_method_is_reported_above_100_percent_of_its_floor():
    """Floors from a machine far slower than the methods: every floor fraction <= 1."""
    records = _records()
    machine = roofline.best_of_run(roofline.Machine(1.0, {"float32": 1.0}), records)
    for rec in records:
        rec["floor_ms"] = roofline.floor_ms(rec["bytes"], rec["flops"], rec["dtype"], machine)
    sweep.compare(records)
    assert all(0 < rec["floor_fraction"] <= 1 for rec in records)
    text = report.table(records, machine, "cpu")
    percents = [float(tok[:-1]) for line in text.splitlines() for tok in line.split() if tok.endswith("%") and tok != "%"]
    assert percents and max(percents) <= 100.0


def test_bench_run_reports_no_fraction_above_100_percent(tmp_path, capsys):
    from entskip import bench
    import json

    argv = "--device cpu --n 256 --dims 64 --blocks 16 --densities 1/4 --dtypes float32 --repeats 2 --budget 1"
    path = bench.main([*argv.split(), "--methods", "entskip-bsr", "addmm", "--no-backward", "--no-plot",
                       "--out", str(tmp_path)])
    data = json.loads(path.read_text())
    fractions = [r["floor_fraction"] for r in data["results"] if r["status"] == "ok"]
    assert fractions and max(fractions) <= 1.0
    assert set(data["roofline"]["sources"]) == {"bandwidth", "peak"} and "machine_measured" in data["roofline"]


# ---------------------------------------------------------------------------------------------
# Issue 14 e: a float alpha is made on the device without a host-to-device copy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_alpha_is_not_made_by_torch_tensor(monkeypatch, backend):
    """``torch.tensor(value, device=cuda)`` copies from the host (blocking, illegal under CUDA
    graph capture); ``torch.full`` fills on the device."""
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append((a, k)) or real(*a, **k))
    x = torch.randn(3, 64, dtype=torch.float32)
    with entskip.use_backend(backend):
        for mapping in (None, _sparse().float(), mappings.orthogonal(64), mappings.permutation(64)):
            y = entskip.skip_add(x, mapping, None, 0.25)
            assert torch.isfinite(y).all()
    assert made == []
