"""EntangledSkip / EntangledResidual: shapes, memory formats, state_dict, .to, compile."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import entskip
from entskip import mappings, reference

from conftest import assert_close

KINDS = [
    ("identity", {}),
    ("orthogonal", {"seed": 1}),
    ("block_orthogonal", {"block": 8, "seed": 2}),
    ("permutation", {"seed": 3}),
    ("sparse", {"density": 0.25, "block": 8, "seed": 4}),
    ("structural", {"rho": 0.3, "block": 8}),
]


def _expected(skip, x, branch, feature_dim=-1):
    xm = x.movedim(feature_dim, -1).double()
    bm = None if branch is None else branch.movedim(feature_dim, -1).double()
    y = reference.skip_add(xm, skip.mapping.matrix().double(), bm, skip.alpha.double())
    return y.movedim(-1, feature_dim)


@pytest.mark.parametrize("kind, kw", KINDS, ids=[k for k, _ in KINDS])
def test_skip_on_token_activations(kind, kw):
    skip = entskip.EntangledSkip(32, kind, alpha=0.6, **kw)
    x, branch = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    y = skip(x, branch)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, _expected(skip, x, branch), torch.float32, "y")
    assert_close(skip(x), _expected(skip, x, None), torch.float32, "y without branch")


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("kind, kw", KINDS, ids=[k for k, _ in KINDS])
def test_skip_on_nchw_keeps_memory_format(kind, kw, channels_last):
    skip = entskip.EntangledSkip(16, kind, alpha=0.8, **{**kw, "block": 8} if "block" in kw else kw)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 5, 3).to(memory_format=fmt)
    branch = torch.randn(2, 16, 5, 3).to(memory_format=fmt)
    y = skip(x, branch)
    assert y.shape == x.shape
    assert y.is_contiguous(memory_format=fmt)
    assert_close(y, _expected(skip, x, branch, feature_dim=1), torch.float32, "y")


def test_explicit_feature_dim_resolves_ambiguous_shapes():
    skip = entskip.EntangledSkip(8, "orthogonal", feature_dim=1)
    x = torch.randn(2, 8, 4, 8)  # dim 1 and the last dim both have 8 entries
    assert_close(skip(x), _expected(skip, x, None, feature_dim=1), torch.float32, "y")
    auto = entskip.EntangledSkip(8, skip.mapping)
    assert_close(auto(x), _expected(auto, x, None, feature_dim=-1), torch.float32, "y")


def test_residual_wraps_a_branch():
    branch = nn.Sequential(nn.Linear(32, 32), nn.GELU())
    block = entskip.EntangledResidual(branch, 32, "sparse", alpha=0.7, density=0.25, block=8)
    x = torch.randn(6, 32, requires_grad=True)
    y = block(x)
    assert_close(y, _expected(block.skip, x, branch(x)), torch.float32, "y")
    y.sum().backward()
    assert x.grad is not None and branch[0].weight.grad is not None


@pytest.mark.parametrize("kind, kw", KINDS, ids=[k for k, _ in KINDS])
def test_state_dict_round_trip(kind, kw):
    skip = entskip.EntangledSkip(32, kind, alpha=0.55, learnable_alpha=True, **kw)
    other_kw = {**kw, "seed": kw["seed"] + 10} if "seed" in kw else kw
    fresh = entskip.EntangledSkip(32, kind, alpha=1.0, learnable_alpha=True, **other_kw)
    fresh.load_state_dict(skip.state_dict())
    x, branch = torch.randn(4, 32), torch.randn(4, 32)
    assert torch.equal(fresh(x, branch), skip(x, branch))
    assert float(fresh.alpha.detach()) == pytest.approx(0.55)


def test_extra_repr_is_useful():
    text = repr(entskip.EntangledSkip(64, "sparse", alpha=0.6, density=0.25, block=16, learnable_alpha=True))
    for part in ("dim=64", "kind=sparse", "alpha=0.6", "learnable_alpha=True", "block=16", "density=0.25"):
        assert part in text, text


def test_to_device_and_dtype():
    skip = entskip.EntangledSkip(32, "sparse", density=0.25, block=8)
    moved = copy.deepcopy(skip).to(torch.float64)
    assert moved.mapping.blocks.dtype == torch.float64 and moved.alpha.dtype == torch.float64
    assert moved.mapping.crow_indices.dtype == torch.int64 and moved.mapping.perm.dtype == torch.int64
    x = torch.randn(3, 32, dtype=torch.float64)
    assert moved(x).dtype == torch.float64
    meta = copy.deepcopy(skip).to("meta")
    assert meta.mapping.blocks.device.type == "meta" and meta.mapping.perm.device.type == "meta"
    assert "alpha=?" in repr(meta)
    made = entskip.EntangledSkip(32, "orthogonal", dtype=torch.float64)
    assert made.mapping.weight.dtype == torch.float64


def test_mapping_dtype_follows_activations():
    skip = entskip.EntangledSkip(32, "sparse", density=0.5, block=8)  # float32 values
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = skip(x, torch.randn(3, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_learnable_alpha_and_mapping_train():
    skip = entskip.EntangledSkip(32, "sparse", alpha=0.9, learnable_alpha=True, density=0.25, block=8, learnable=True)
    names = {n for n, _ in skip.named_parameters()}
    assert names == {"alpha", "mapping.blocks"}
    opt = torch.optim.SGD(skip.parameters(), lr=0.1)
    before = [p.detach().clone() for p in skip.parameters()]
    x, target = torch.randn(16, 32), torch.randn(16, 32)
    loss = (skip(x) - target).pow(2).mean()
    loss.backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, skip.parameters()))


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="unknown mapping 'spars'"):
        entskip.EntangledSkip(32, "spars")
    with pytest.raises(ValueError, match="mapping has 64 input features but dim is 32"):
        entskip.EntangledSkip(32, mappings.orthogonal(64))
    with pytest.raises(TypeError, match="mapping keywords"):
        entskip.EntangledSkip(32, mappings.orthogonal(32), seed=3)
    with pytest.raises(TypeError, match="mapping must be a mapping name"):
        entskip.EntangledSkip(32, torch.eye(32))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("kind, kw", [KINDS[1], KINDS[4], KINDS[0]], ids=["orthogonal", "sparse", "identity"])
def test_compile_fullgraph_matches_eager(kind, kw, backend):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(32, 32), entskip.EntangledResidual(nn.Linear(32, 32), 32, kind, alpha=0.7, learnable_alpha=True, **kw))
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 3, 32)
    with entskip.use_backend(backend):
        y_eager = model(x)
        g_eager = torch.autograd.grad(y_eager.sum(), list(model.parameters()))
        y_comp = compiled(x)
        g_comp = torch.autograd.grad(y_comp.sum(), list(model.parameters()))
    assert_close(y_comp, y_eager, torch.float32, "y")
    for a, b in zip(g_comp, g_eager):
        assert_close(a, b, torch.float32, "grad")
