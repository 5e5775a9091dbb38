"""Bad input raises a clear exception naming the argument; backend selection is explicit."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import entskip
from entskip import mappings

from conftest import make_mapping


@pytest.fixture
def sparse64():
    return make_mapping("sparse", 64, 8).float()


def test_feature_mismatch(sparse64):
    with pytest.raises(ValueError, match="x has 32 features.*expects 64"):
        entskip.skip_add(torch.randn(4, 32), sparse64)
    with pytest.raises(ValueError, match="x has 64 features.*expects 48"):
        entskip.skip_add(torch.randn(4, 64), torch.randn(10, 48))


def test_branch_shape_and_dtype(sparse64):
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="branch must have shape"):
        entskip.skip_add(x, sparse64, torch.randn(4, 63))
    with pytest.raises(ValueError, match="branch must have shape"):
        entskip.skip_add(x, sparse64, torch.randn(5, 64))
    with pytest.raises(TypeError, match="branch has dtype torch.float64"):
        entskip.skip_add(x, sparse64, torch.randn(4, 64, dtype=torch.float64))


def test_devices_must_match(sparse64):
    with pytest.raises(ValueError, match="branch is on meta"):
        entskip.skip_add(torch.randn(4, 64), sparse64, torch.empty(4, 64, device="meta"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.complex64, torch.bool])
def test_non_float_dtypes(sparse64, dtype):
    bad = torch.ones(4, 64, dtype=dtype)
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        entskip.skip_add(bad, sparse64)
    with pytest.raises(TypeError, match="branch must have a floating-point dtype"):
        entskip.skip_add(torch.randn(4, 64), sparse64, bad)
    with pytest.raises(TypeError, match="mapping must have a floating-point dtype"):
        entskip.skip_add(torch.randn(4, 64), torch.ones(64, 64, dtype=dtype))


def test_not_a_tensor(sparse64):
    with pytest.raises(TypeError, match="x must be a tensor"):
        entskip.skip_add([1.0, 2.0], sparse64)
    with pytest.raises(TypeError, match="mapping must be an entskip Mapping"):
        entskip.skip_add(torch.randn(4, 64), "sparse")


def test_block_size_must_divide_dim():
    with pytest.raises(ValueError, match="not divisible by the block size 32"):
        mappings.sparse(100, block=32)
    with pytest.raises(ValueError, match="not divisible by the block size"):
        entskip.EntangledSkip(100, "block_orthogonal", block=16)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_alpha_must_be_finite(sparse64, bad, cpu_backend):
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="alpha must be finite"):
        entskip.skip_add(x, sparse64, None, bad)
    with pytest.raises(ValueError, match="alpha must be finite"):  # a CPU tensor is checked eagerly
        entskip.skip_add(x, sparse64, None, torch.tensor(bad))
    with pytest.raises(RuntimeError, match="alpha must be finite"):  # the kernel checks too
        torch.ops.entskip.bsr_skip_add(x, sparse64.blocks, *sparse64.layout.tensors(), torch.tensor(bad), None)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        entskip.EntangledSkip(64, alpha=bad)


def test_alpha_shape_and_dtype(sparse64):
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="alpha must be a float or a 0-d tensor"):
        entskip.skip_add(x, sparse64, None, torch.ones(2))
    with pytest.raises(TypeError, match="alpha must be floating point"):
        entskip.skip_add(x, sparse64, None, torch.tensor(1))
    with pytest.raises(TypeError, match="alpha must be a float"):
        entskip.skip_add(x, sparse64, None, "0.5")
    assert torch.equal(entskip.skip_add(x, sparse64, None, 1), entskip.skip_add(x, sparse64, None, 1.0))


def test_feature_dim_out_of_range(sparse64):
    with pytest.raises(ValueError, match="feature_dim 5 is out of range"):
        entskip.skip_add(torch.randn(4, 64), sparse64, feature_dim=5)


@pytest.mark.parametrize("mapping", [None, "identity", "permutation"])
def test_feature_dim_must_be_an_int_for_elementwise_mappings_too(mapping):
    """The short path of the identity and permutation skips takes feature_dim=-1 only as an int."""
    m = None if mapping is None else entskip.mappings.make(mapping, 8)
    x, alpha = torch.randn(4, 8), torch.tensor(0.5)
    with pytest.raises(TypeError, match="feature_dim must be an int"):
        entskip.skip_add(x, m, x, alpha, feature_dim=-1.0)


def test_invalid_sparse_bsr_tensor_is_rejected():
    crow, col = torch.tensor([0, 2, 2]), torch.tensor([1, 0])  # unsorted row
    bsr = torch.sparse_bsr_tensor(crow, col, torch.randn(2, 4, 4), (8, 8), check_invariants=False)
    with pytest.raises(ValueError, match="sorted"):
        entskip.skip_add(torch.randn(3, 8), bsr)


@pytest.mark.parametrize(
    "field, corrupt, message",
    [
        ("crow", lambda t: t.flip(0), "crow_indices"),
        ("crow", lambda t: torch.cat([t[:-1], t[-1:] - 1]), "crow_indices must start at 0 and end at"),
        ("col", lambda t: t + 100, "col_indices"),
        ("col", lambda t: t - 100, "col_indices"),
        ("ccol", lambda t: t.flip(0), "ccol_indices"),
        ("row", lambda t: t + 100, "row_indices"),
        ("perm", lambda t: t + 100, "perm"),
        ("crow", lambda t: t.int(), "crow_indices must be a 1-D int64"),
    ],
)
def test_native_op_rejects_corrupt_layouts(sparse64, field, corrupt, message):
    """A direct torch.ops call never reads out of bounds: the C++ kernel checks the layout."""
    names = ["crow", "col", "ccol", "row", "perm"]
    layout = list(sparse64.layout.tensors())
    layout[names.index(field)] = corrupt(layout[names.index(field)].clone())
    x, a = torch.randn(4, 64), torch.tensor(1.0)
    if field in ("crow", "col"):  # the forward reads only these
        with pytest.raises(RuntimeError, match=message):
            torch.ops.entskip.bsr_skip_add(x, sparse64.blocks, *layout, a, None)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.entskip.bsr_skip_add_backward(x, x, sparse64.blocks, *layout, a, [True, True, True])


def test_native_op_rejects_bad_shapes(sparse64):
    x, a = torch.randn(4, 64), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="values must have shape"):
        torch.ops.entskip.bsr_skip_add(x, sparse64.blocks[:, :4], *sparse64.layout.tensors(), a, None)
    with pytest.raises(RuntimeError, match="not divisible by the block size"):
        torch.ops.entskip.bsr_skip_add(torch.randn(4, 60), sparse64.blocks, *sparse64.layout.tensors(), a, None)
    with pytest.raises(RuntimeError, match="branch must have shape"):
        torch.ops.entskip.bsr_skip_add(x, sparse64.blocks, *sparse64.layout.tensors(), a, torch.randn(3, 64))
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.entskip.dense_skip_add(x, torch.randn(64, 32), a, None)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16 or float16"):
        torch.ops.entskip.dense_skip_add(x.int(), torch.randn(64, 64).int(), a, None)


def test_backend_selection():
    assert entskip.get_backend() in entskip.backends.BACKENDS
    with pytest.raises(ValueError, match="backend must be one of"):
        entskip.set_backend("fast")
    with entskip.use_backend("reference"):
        assert entskip.get_backend() == "reference"
        for gpu_backend in ("triton", "cuda"):
            with pytest.raises(ValueError, match=f"backend '{gpu_backend}' runs CUDA tensors only"):
                with entskip.use_backend(gpu_backend):
                    entskip.skip_add(torch.randn(2, 8), torch.randn(8, 8))
        assert entskip.get_backend() == "reference"
    with entskip.use_backend("cpu"):
        with pytest.raises(ValueError, match="backend 'cpu' runs CPU tensors only"):
            entskip.skip_add(torch.empty(2, 8, device="meta"), torch.empty(8, 8, device="meta"))


def test_backend_environment_variable():
    code = "import entskip; print(entskip.get_backend())"
    env = dict(os.environ, ENTSKIP_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["ENTSKIP_BACKEND"] = "nonsense"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "backend must be one of" in out.stderr


def test_auto_picks_native_kernel_on_cpu(sparse64, monkeypatch):
    calls = []
    real = torch.ops.entskip.bsr_skip_add

    monkeypatch.setattr(entskip.bsr_skip.torch.ops.entskip, "bsr_skip_add", lambda *a: calls.append(1) or real(*a))
    with entskip.use_backend("auto"):
        entskip.skip_add(torch.randn(3, 64), sparse64)
    assert calls == [1]
