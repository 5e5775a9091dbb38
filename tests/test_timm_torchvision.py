"""entangle() on timm's VisionTransformer and torchvision's ResNets.

timm and torchvision are optional: each test skips, with the reason shown, where its
package is not installed.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import entskip
from entskip import reference, schedules

from conftest import assert_close

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]


def _assert_same(actual, expected, what):
    """Bit-identical on CPU; on CUDA, equal up to float32 rounding (kernel choice may differ)."""
    if actual.device.type == "cpu":
        assert torch.equal(actual, expected), what
    else:
        assert_close(actual, expected, torch.float32, what)


def _images(device, size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, size, size, generator=gen).to(device)


# --- timm -----------------------------------------------------------------------


def _vit_tiny(device, **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).to(device).eval()


def _timm_block_type():
    return pytest.importorskip("timm.models.vision_transformer").Block


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kwargs", [{}, {"init_values": 0.1}], ids=["plain", "layer_scale"])
def test_timm_identity_conversion_keeps_outputs(device, kwargs):
    model = _vit_tiny(device, **kwargs)
    x = _images(device, 224)
    with torch.no_grad():
        before = model(x)
        assert entskip.count_skips(model) == 24  # 12 blocks x (attention, MLP)
        entskip.entangle(model, "identity", "constant", alpha=1.0)
        _assert_same(model(x), before, "logits")
    for block in model.blocks:
        assert isinstance(block, _timm_block_type())
        assert block.skip_attn.mapping.kind == block.skip_mlp.mapping.kind == "identity"


@pytest.mark.parametrize("device", DEVICES)
def test_timm_attention_mask_still_reaches_the_attention(device):
    block_type = _timm_block_type()
    if "attn_mask" not in inspect.signature(block_type.forward).parameters:
        pytest.skip("this timm's Block takes no attn_mask")
    model = _vit_tiny(device)
    tokens = torch.randn(2, 197, 192, generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.rand(197, 197, generator=torch.Generator().manual_seed(2)).to(device) > 0.3
    mask.fill_diagonal_(True)
    block = model.blocks[3]
    with torch.no_grad():
        before = block(tokens, attn_mask=mask)
        assert not torch.equal(before, block(tokens))
        entskip.entangle(model, "identity", "constant")
        _assert_same(block(tokens, attn_mask=mask), before, "masked block")


@pytest.mark.parametrize("device", DEVICES)
def test_timm_sparse_conversion_runs_both_residuals_per_sublayer(device):
    model = _vit_tiny(device)
    entskip.entangle(model, "sparse", density=0.25, block=16)  # defaults: schedule="decay", alpha_min=0.8
    skips = [s for b in model.blocks for s in (b.skip_attn, b.skip_mlp)]
    assert [float(s.alpha) for s in skips] == pytest.approx(schedules.decayed(12, 0.8, per_sublayer=True), abs=1e-7)
    assert all(s.mapping.kind == "sparse" and s.alpha.device.type == device for s in skips)
    block = model.blocks[5]
    x = torch.randn(2, 197, 192, generator=torch.Generator().manual_seed(3)).to(device)

    def skip(s, inp, branch):
        return reference.skip_add(inp, s.mapping.matrix(), branch, s.alpha)

    with torch.no_grad():
        h = skip(block.skip_attn, x, block.attn(block.norm1(x)))
        expected = skip(block.skip_mlp, h, block.mlp(block.norm2(h)))
        assert_close(block(x), expected, torch.float32, "block output")
        assert model(_images(device, 224)).shape == (2, 1000)


@pytest.mark.parametrize("device", DEVICES)
def test_timm_zero_init_and_checkpoint_round_trip(device):
    model = _vit_tiny(device)
    entskip.entangle(model, "block_orthogonal", alpha_min=0.6, zero_init_branch=True, block=32, learnable=True)
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.fc2.weight.any()
    x = _images(device, 224, seed=4)
    tokens = torch.randn(2, 197, 192, generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        block = model.blocks[0]
        assert_close(block(tokens), block.skip_mlp(block.skip_attn(tokens)), torch.float32, "zero branches")
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        fresh = _vit_tiny(device)
        entskip.entangle(fresh, "block_orthogonal", alpha_min=0.6, zero_init_branch=True, block=32, learnable=True, seed=9)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(x), model(x))


# --- torchvision ----------------------------------------------------------------


def _resnet(name, device):
    tv_models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    return getattr(tv_models, name)(weights=None).to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, skips", [("resnet18", 5), ("resnet50", 12)])
def test_torchvision_identity_conversion_keeps_outputs(name, skips, device):
    model = _resnet(name, device)
    block_types = {type(m) for m in model.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")}
    x = _images(device, 64)
    with torch.no_grad():
        before = model(x)
        assert entskip.count_skips(model) == skips  # every block but the first of each stage past the stem
        entskip.entangle(model, "identity", "constant")
        _assert_same(model(x), before, "logits")
    blocks = [m for m in model.modules() if isinstance(m, tuple(block_types))]
    for block in blocks:
        if block.downsample is None:
            assert type(block).__name__.startswith("Entangled") and block.skip.mapping.kind == "identity"
        else:
            assert type(block) in block_types and not hasattr(block, "skip")  # projection shortcut kept


@pytest.mark.parametrize("device", DEVICES)
def test_torchvision_sparse_conversion_mixes_channels(device):
    model = _resnet("resnet18", device)
    entskip.entangle(model, "sparse", density=0.25, block=16, alpha_min=0.5, zero_init_branch=True)
    converted = [b for b in model.modules() if hasattr(b, "skip")]
    assert [float(b.skip.alpha) for b in converted] == pytest.approx(schedules.decayed(5, 0.5), abs=1e-7)
    for b in model.modules():
        if type(b).__name__.endswith("BasicBlock"):
            assert bool(b.bn2.weight.any()) == (b.downsample is not None)
    block = converted[2]
    torch.nn.init.normal_(block.bn2.weight)
    x = torch.randn(2, block.skip.dim, 8, 8, generator=torch.Generator().manual_seed(6)).to(device)
    with torch.no_grad():
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        mixed = reference.skip_add(x.movedim(1, -1), block.skip.mapping.matrix(), branch.movedim(1, -1), block.skip.alpha)
        assert_close(block(x), torch.relu(mixed.movedim(-1, 1)), torch.float32, "block output")
        assert model(_images(device, 64)).shape == (2, 1000)
