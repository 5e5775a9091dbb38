"""entangle(model): own models, schedules per skip, seeds, zero init, custom adapters,
errors, torch.compile and state_dict round trips."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import entskip
from entskip import convert, mappings, models, reference, schedules

from conftest import assert_close


def _vit(seed=0, depth=3):
    torch.manual_seed(seed)
    return models.ViT(image_size=8, patch_size=4, num_classes=5, dim=32, depth=depth, num_heads=2)


def _resnet(seed=0):
    torch.manual_seed(seed)
    return models.ResNet(depth=14, width=32, num_classes=5).eval()  # eval: BN uses running stats


def _rnn(seed=0):
    torch.manual_seed(seed)
    return models.ResidualRNN(input_size=6, hidden_size=32, num_layers=3, num_classes=5)


def _input(model, seed):
    gen = torch.Generator().manual_seed(seed)
    if isinstance(model, models.ResidualRNN):
        return torch.randn(3, 5, 6, generator=gen)
    return torch.randn(3, 3, 8, 8, generator=gen)


def _skips(model):
    """The converted skips in forward order."""
    return [m for m in model.modules() if isinstance(m, entskip.EntangledSkip) and m.mapping.kind != "identity"]


MODELS = {"vit": _vit, "resnet": _resnet, "rnn": _rnn}
# ResNet-14: 3 stages x 2 blocks, the first block of stages 2 and 3 projects -> 4 identity skips.
NUM_SKIPS = {"vit": 6, "resnet": 4, "rnn": 3}


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the adapter registry, so a test's registrations do not leak."""
    monkeypatch.setattr(convert, "_ADAPTERS", dict(convert._ADAPTERS))


def test_supported_blocks_lists_own_and_third_party_types():
    names = entskip.supported_blocks()
    assert names == sorted(names)
    for name in [
        "entskip.models.resnet.BasicBlock",
        "entskip.models.vit.Block",
        "entskip.models.rnn.ResidualRNNCell",
        "timm.models.vision_transformer.Block",
        "torchvision.models.resnet.BasicBlock",
        "torchvision.models.resnet.Bottleneck",
    ]:
        assert name in names


def test_import_does_not_import_timm_or_torchvision():
    code = "import sys, entskip; print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", MODELS)
def test_identity_conversion_keeps_outputs_bit_identical(name):
    model = MODELS[name]()
    x = _input(model, 1)
    before = model(x)
    assert entskip.count_skips(model) == NUM_SKIPS[name]
    assert entskip.entangle(model, "identity", "constant") is model
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("name", MODELS)
def test_sparse_conversion_installs_one_seeded_skip_per_layer(name):
    model = MODELS[name]()
    entskip.entangle(model, "sparse", density=0.5, block=8, seed=5, alpha_min=0.8)
    skips = _skips(model)
    assert len(skips) == NUM_SKIPS[name]
    for i, skip in enumerate(skips):
        expected = mappings.sparse(skip.dim, density=0.5, block=8, seed=5 + i)
        assert skip.mapping.kind == "sparse"
        assert skip.mapping.layout == expected.layout, f"skip {i}: layout"
        assert torch.equal(skip.mapping.blocks, expected.blocks), f"skip {i}: blocks"
    same_dim = [s for s in skips if s.dim == skips[0].dim]
    assert not torch.equal(same_dim[0].mapping.blocks, same_dim[1].mapping.blocks)
    y = model(_input(model, 2))
    assert y.shape == (3, 5) and torch.isfinite(y).all()


def test_vit_block_runs_both_entangled_residuals():
    model = _vit()
    entskip.entangle(model, "sparse", density=0.5, block=8, alpha_min=0.8)
    block = model.blocks[1]
    x = torch.randn(2, 5, 32)

    def skip(s, inp, branch):
        return reference.skip_add(inp, s.mapping.matrix(), branch, s.alpha)

    h = skip(block.skip_attn, x, block.attn(block.norm1(x)))
    expected = skip(block.skip_mlp, h, block.mlp(block.norm2(h)))
    assert_close(block(x), expected, torch.float32, "block output")


def test_resnet_skips_mix_channels_and_leave_projections():
    model = _resnet()
    entskip.entangle(model, "orthogonal", alpha_min=0.8)
    for block in model.layers:
        if block.downsample is not None:
            assert block.skip.mapping.kind == "identity" and float(block.skip.alpha) == 1.0
            continue
        assert block.skip.mapping.kind == "orthogonal"
        x = torch.randn(2, block.skip.dim, 4, 4)
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        mixed = reference.skip_add(x.movedim(1, -1), block.skip.mapping.matrix(), branch.movedim(1, -1), block.skip.alpha)
        assert_close(block(x), torch.relu(mixed.movedim(-1, 1)), torch.float32, "block output")


def test_rnn_skip_carries_the_state_through_the_mapping():
    cell = _rnn().cells[0]
    entskip.entangle(cell, "orthogonal", "constant", alpha=0.9)
    x_t, h = torch.randn(4, 6), torch.randn(4, 32)
    branch = cell.out(torch.tanh(cell.in_x(x_t) + cell.in_h(h)))
    assert_close(cell(x_t, h), 0.9 * h @ cell.skip.mapping.matrix().T + branch, torch.float32, "h_{t+1}")


# --- schedules ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("vit", schedules.decayed(3, 0.6, per_sublayer=True)),  # two residuals per block: 1.0 ... 0.6
        ("resnet", schedules.decayed(4, 0.6)),
        ("rnn", schedules.decayed(3, 0.6)),
    ],
)
def test_decay_schedule_gives_each_skip_its_value_in_order(name, expected):
    model = MODELS[name]()
    entskip.entangle(model, "orthogonal", alpha_min=0.6, zero_init_branch=True)
    got = [float(s.alpha) for s in _skips(model)]
    assert got == pytest.approx(expected, abs=1e-7)
    assert got[-1] == pytest.approx(0.6)


def test_vit_per_sublayer_order_is_attention_then_mlp():
    model = _vit()
    entskip.entangle(model, "identity", [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], zero_init_branch=True)
    got = [float(getattr(b, attr).alpha) for b in model.blocks for attr in ("skip_attn", "skip_mlp")]
    assert got == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])


def test_constant_schedule_and_learnable_alpha():
    model = _rnn()
    entskip.entangle(model, "permutation", "constant", alpha=0.85, learnable_alpha=True)
    alphas = [cell.skip.alpha for cell in model.cells]
    assert all(isinstance(a, nn.Parameter) and float(a.detach()) == pytest.approx(0.85) for a in alphas)
    model(_input(model, 3)).sum().backward()
    assert all(a.grad is not None and a.grad != 0 for a in alphas)


def test_default_decay_stops_at_0_8_without_warning():
    model = _vit()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entskip.entangle(model, "identity")
    assert float(model.blocks[-1].skip_mlp.alpha) == pytest.approx(0.8)


def test_low_alpha_without_zero_init_warns():
    with pytest.warns(UserWarning, match="zero_init_branch=True"):
        entskip.entangle(_vit(), "identity", alpha_min=0.6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule=[0.9] * 5), "schedule has 5 alphas but the model has 6 skips"),
        (dict(schedule=[0.9] * 5 + [float("nan")]), "finite"),
        (dict(schedule="linear"), "schedule must be 'decay', 'constant' or a list"),
        (dict(schedule="constant", alpha_min=0.5), "alpha_min is used only by schedule='decay'"),
        (dict(alpha=0.5), "alpha is used only by schedule='constant'"),
        (dict(alpha_min=1.5), "alpha_min must be in"),
    ],
)
def test_bad_schedules_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        entskip.entangle(_vit(), "identity", **kwargs)


# --- zero init ------------------------------------------------------------------


def test_zero_init_branch_makes_vit_blocks_pure_skips():
    model = _vit()
    entskip.entangle(model, "sparse", density=0.5, block=8, alpha_min=0.5, zero_init_branch=True)
    for block in model.blocks:
        for layer in (block.attn.proj, block.mlp.fc2):
            assert not layer.weight.any() and not layer.bias.any()
        assert block.attn.qkv.weight.any()
        x = torch.randn(2, 5, 32)
        assert_close(block(x), block.skip_mlp(block.skip_attn(x)), torch.float32, "zero-branch block")


def test_zero_init_branch_only_touches_converted_resnet_blocks():
    model = _resnet()
    entskip.entangle(model, "identity", alpha_min=0.5, zero_init_branch=True)
    for block in model.layers:
        assert bool(block.bn2.weight.any()) == (block.downsample is not None)


# --- custom adapters ------------------------------------------------------------


class PlainBlock(nn.Module):
    """A block we may not edit: ``x + ff(norm(x))``."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.ff(self.norm(x))


def _plain_forward(self, x):
    return self.skip(x, self.ff(self.norm(x)))


PLAIN_ADAPTER = entskip.BlockAdapter(
    skips=lambda b: [entskip.SkipSpec("skip", b.ff[-1].out_features, -1, b.ff[-1])], forward=_plain_forward
)


@pytest.mark.parametrize("key", ["class", "qualified_name"])
def test_custom_adapter_patches_forward(registry, key):
    torch.manual_seed(0)
    model = nn.Sequential(PlainBlock(16), nn.ReLU(), PlainBlock(16))
    x = torch.randn(4, 16)
    before = model(x)
    entskip.register_adapter(PlainBlock if key == "class" else f"{__name__}.PlainBlock", PLAIN_ADAPTER)
    assert f"{__name__}.PlainBlock" in entskip.supported_blocks()
    entskip.entangle(model, "identity", "constant")
    assert torch.equal(model(x), before)

    entskip.entangle(model, "block_orthogonal", [0.9, 0.7], block=8, zero_init_branch=True)  # re-entangle
    assert all(isinstance(b, PlainBlock) and type(b).__name__ == "EntangledPlainBlock" for b in model[::2])
    h = x
    for i, block in enumerate(model[::2]):
        assert not block.ff[-1].weight.any()
        h = reference.skip_add(h if i == 0 else h.relu(), block.skip.mapping.matrix(), None, block.skip.alpha)
    assert_close(model(x), h, torch.float32, "zero branches: a chain of pure skips")

    torch.manual_seed(1)
    for block in model[::2]:
        nn.init.normal_(block.ff[-1].weight)
    h = x
    for i, block in enumerate(model[::2]):
        h = h if i == 0 else h.relu()
        h = reference.skip_add(h, block.skip.mapping.matrix(), block.ff(block.norm(h)), block.skip.alpha)
    assert_close(model(x), h, torch.float32, "patched forward")


def test_subclass_of_a_registered_block_is_not_matched(registry):
    class Sub(PlainBlock):
        pass

    entskip.register_adapter(PlainBlock, PLAIN_ADAPTER)
    with pytest.raises(ValueError, match="no supported residual block"):
        entskip.entangle(Sub(8))


def test_register_adapter_checks_its_arguments():
    with pytest.raises(TypeError, match="block_type"):
        entskip.register_adapter(42, PLAIN_ADAPTER)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        entskip.register_adapter(dict, PLAIN_ADAPTER)
    with pytest.raises(TypeError, match="adapter must be an entskip.BlockAdapter"):
        entskip.register_adapter(PlainBlock, _plain_forward)


def test_zero_init_needs_a_branch_output(registry):
    entskip.register_adapter(
        PlainBlock, entskip.BlockAdapter(lambda b: [entskip.SkipSpec("skip", 8)], forward=_plain_forward)
    )
    with pytest.raises(ValueError, match="names no branch output layer"):
        entskip.entangle(PlainBlock(8), "identity", zero_init_branch=True)


# --- errors ---------------------------------------------------------------------


def test_unknown_model_lists_supported_types():
    with pytest.raises(ValueError, match=r"no supported residual block in Sequential\. Supported block types: .*"
                       r"entskip\.models\.vit\.Block.*torchvision\.models\.resnet\.Bottleneck.*register_adapter"):
        entskip.entangle(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_blocks_without_identity_skips_raise():
    block = models.BasicBlock(8, 16, stride=2)
    assert entskip.count_skips(block) == 0
    with pytest.raises(ValueError, match="none has an identity skip"):
        entskip.entangle(block)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (("dense",), {}, ValueError, "mapping must be one of"),
        (("sparse",), {"block": 12}, ValueError, r"skip for 'blocks\.0\.skip_attn' \(dim=32\): dim 32 is not divisible"),
        (("structural",), {"seed": 1}, TypeError, "blocks.0.skip_attn"),
        (("sparse",), {"seed": "one"}, TypeError, "seed must be an int"),
    ],
)
def test_bad_mappings_raise_and_leave_the_model_untouched(args, kwargs, error, match):
    model = _vit()
    with pytest.raises(error, match=match):
        entskip.entangle(model, *args, **kwargs)
    assert _skips(model) == []


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        entskip.entangle("resnet")


# --- torch.compile --------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_compile_fullgraph_of_converted_model(name):
    torch._dynamo.reset()
    torch.manual_seed(0)  # the smallest converted models: compiling costs seconds per block
    model = _vit(depth=1) if name == "vit" else models.ResNet(depth=8, width=32, num_classes=5).eval()
    entskip.entangle(model, "sparse", density=0.5, block=8, learnable=True, learnable_alpha=True, alpha_min=0.8)
    x = _input(model, 4)
    compiled = torch.compile(model, fullgraph=True)
    y_eager = model(x)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), list(model.parameters()))
    y_comp = compiled(x)
    grads_comp = torch.autograd.grad(y_comp.square().sum(), list(model.parameters()))
    assert_close(y_comp, y_eager, torch.float32, "logits")
    for (pname, _), g_c, g_e in zip(model.named_parameters(), grads_comp, grads_eager):
        assert_close(g_c, g_e, torch.float32, f"grad {pname}")


# --- checkpoints ----------------------------------------------------------------


def _trained(name):
    """A converted model with learnable mapping and alphas, moved off its initial values."""
    model = MODELS[name](seed=1)
    entskip.entangle(model, "sparse", density=0.5, block=8, seed=0, learnable=True, learnable_alpha=True, alpha_min=0.8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip_is_bit_identical(name):
    source = _trained(name)
    target = MODELS[name](seed=2)
    entskip.entangle(target, "sparse", density=0.5, block=8, seed=100, learnable=True, learnable_alpha=True, alpha_min=0.8)
    x = _input(source, 5)
    assert not torch.equal(target(x), source(x))
    target.load_state_dict(source.state_dict())
    for s, t in zip(_skips(source), _skips(target)):
        assert s.mapping.layout == t.mapping.layout  # the checkpoint's layout, not the target's seed
    assert torch.equal(target(x), source(x))


@pytest.mark.parametrize(
    "field, tamper, match",
    [
        ("crow_indices", lambda t: t.flip(0), "crow_indices must start at 0"),
        ("col_indices", lambda t: t + 100, "col_indices must lie in"),
        ("col_indices", lambda t: torch.zeros_like(t), "duplicate block columns"),
    ],
)
def test_tampered_layout_fails_to_load(field, tamper, match):
    state = _trained("vit").state_dict()
    key = f"blocks.1.skip_mlp.mapping.{field}"
    state[key] = tamper(state[key])
    target = _vit()
    entskip.entangle(target, "sparse", density=0.5, block=8, learnable=True, learnable_alpha=True, alpha_min=0.8)
    with pytest.raises(ValueError, match=rf"invalid block layout in state_dict at 'blocks\.1\.skip_mlp\.mapping\.'.*{match}"):
        target.load_state_dict(state)
