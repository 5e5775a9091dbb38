"""entangle() on timm's VisionTransformer and torchvision's ResNets.

timm and torchvision are optional: each test skips, with the reason shown, where its
package is not installed.
"""

from __future__ import annotations

import copy
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


def test_torchvision_resnet_entangled_in_both_memory_formats_trains_and_compiles():
    """A converted ResNet-18 runs its skips on NCHW maps (features first, no
    transposes) and on channels_last ones (features last); both give the same logits and
    gradients, a training step updates the mappings and alphas, and torch.compile(fullgraph=True)
    matches eager."""
    base = _resnet("resnet18", "cpu")
    entskip.entangle(base, "block_orthogonal", block=16, learnable=True, learnable_alpha=True)
    gen = torch.Generator().manual_seed(3)
    # float64, batch 4 at 64x64 (layer4 maps 2x2): a freshly initialised ResNet in train mode is
    # ill-conditioned (BatchNorm over few values), and in float32 torch's own ops alone (the reference
    # backend) move some alpha gradients by 8 % against float64 for some initialisations
    images = torch.randn(4, 3, 64, 64, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 1000, (4,), generator=gen)
    results = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        model = copy.deepcopy(base).to(dtype=torch.float64, memory_format=fmt).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        skips = [m for m in model.modules() if isinstance(m, entskip.EntangledSkip) and isinstance(m.alpha, torch.nn.Parameter)]
        assert len(skips) == 5  # the converted blocks (those without a projection shortcut)
        x = images.to(memory_format=fmt)
        # compile against eager in eval mode on the fresh model (after one step, eval-mode BatchNorm
        # uses running statistics of a single small batch, which overflow even an unconverted ResNet)
        model.eval()
        with torch.no_grad():
            eager = model(x)
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True)(x)
        assert torch.isfinite(eager).all()
        assert_close(compiled, eager, torch.float64, "compiled logits")
        model.train()
        before = [s.alpha.detach().clone() for s in skips]
        loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        grads = [s.alpha.grad.clone() for s in skips]
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        opt.step()
        assert all(not torch.equal(s.alpha.detach(), b) for s, b in zip(skips, before)), "the step moved every alpha"
        with torch.no_grad():
            after = model(x)  # train mode: batch statistics
        assert torch.isfinite(after).all()
        results[fmt] = (loss.detach(), torch.stack(grads), after)
    (loss_a, g_a, y_a), (loss_b, g_b, y_b) = results.values()
    assert_close(loss_a, loss_b, torch.float64, "loss, NCHW vs channels_last")
    assert_close(g_a, g_b, torch.float64, "alpha gradients, NCHW vs channels_last", scale=max(1.0, float(g_a.abs().max())))
    assert_close(y_a, y_b, torch.float64, "logits after the step, NCHW vs channels_last")


def test_model_steps_of_the_benchmark_run_timm_and_both_resnet_formats():
    """``python -m entskip.bench --timm-step --resnet-step`` on tiny inputs: every entry timed."""
    pytest.importorskip("timm")
    pytest.importorskip("torchvision.models")
    from entskip.bench import model_steps

    vit = model_steps.timm_step(steps=1, warmup=0, batch=2)
    assert vit["status"] == "ok" and vit["plain_ms"] > 0 and vit["entangled_ms"] > 0
    nets = model_steps.resnet_steps(names=("resnet18",), steps=1, warmup=0, batch=2, size=64)
    assert nets["status"] == "ok"
    assert [(r["model"], r["format"]) for r in nets["results"]] == [("resnet18", "nchw"), ("resnet18", "channels_last")]
    assert all(r["plain_ms"] > 0 and r["entangled_ms"] > 0 for r in nets["results"])
