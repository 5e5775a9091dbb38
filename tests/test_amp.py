"""Mixed precision: under torch.autocast the skip-add runs in the autocast dtype, and the
gradients match a float32 run within the low-precision dtype's tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import entskip
from entskip import mappings, models

from conftest import assert_close

CUDA = torch.cuda.is_available()
# (device, autocast dtype): CPU bf16 everywhere; CUDA fp16 and bf16 where a GPU exists.
SETTINGS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")),
]
KINDS = {
    "identity": lambda: mappings.identity(64),
    "orthogonal": lambda: mappings.orthogonal(64, seed=1, learnable=True),
    "sparse": lambda: mappings.sparse(64, density=0.25, block=16, seed=2, learnable=True),
    "block_orthogonal": lambda: mappings.block_orthogonal(64, block=16, seed=3, learnable=True),
    "permutation": lambda: mappings.permutation(64, seed=4),
}


def _skip_add_run(kind, layout, device, autocast_dtype):
    """``skip_add(x, M, layer(x), alpha)`` with a float32 ``x`` and ``layer`` a Linear on
    ``(N, T, 64)`` tokens or a 3x3 convolution on ``(N, 64, H, W)`` maps: the output and
    the gradients of ``x``, ``alpha``, the layer and the mapping, from seeded inputs."""
    torch.manual_seed(0)
    mapping = KINDS[kind]().to(device)
    if layout == "tokens":
        layer, x, feature_dim = torch.nn.Linear(64, 64), torch.randn(4, 9, 64), -1
    else:
        layer, x, feature_dim = torch.nn.Conv2d(64, 64, 3, padding=1), torch.randn(2, 64, 3, 5), 1
    layer, x = layer.to(device), x.to(device).requires_grad_()
    alpha = torch.tensor(0.7, device=device, requires_grad=True)
    grad_out = torch.randn_like(x)
    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        y = entskip.skip_add(x, mapping, layer(x), alpha, feature_dim=feature_dim)
    leaves = {"x": x, "alpha": alpha, "layer.weight": layer.weight, "layer.bias": layer.bias}
    leaves.update({f"mapping.{n}": p for n, p in mapping.named_parameters()})
    grads = torch.autograd.grad((y.float() * grad_out).sum(), list(leaves.values()))
    # dalpha = sum(g * (x @ M^T)) cancels: judge it against the sum of its terms' magnitudes
    with torch.no_grad():
        skip_path = entskip.skip_add(x, mapping, None, 1.0, feature_dim=feature_dim)
        alpha_scale = float((grad_out * skip_path).abs().sum())
    return y, dict(zip(leaves, grads)), alpha_scale


@pytest.mark.parametrize("device, dtype", SETTINGS)
@pytest.mark.parametrize("layout", ["tokens", "nchw"])
@pytest.mark.parametrize("kind", KINDS)
def test_skip_add_runs_in_the_autocast_dtype_with_matching_grads(kind, layout, device, dtype):
    y, grads, alpha_scale = _skip_add_run(kind, layout, device, dtype)
    y_ref, grads_ref, _ = _skip_add_run(kind, layout, device, None)
    assert y.dtype == dtype and y_ref.dtype == torch.float32
    assert_close(y.float(), y_ref, dtype, "y")
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, f"grad {name} has dtype {grad.dtype}"
        assert_close(grad, grads_ref[name], dtype, f"grad {name}", scale=alpha_scale if name == "alpha" else None)


def test_float64_is_left_alone_under_autocast():
    gen = torch.Generator().manual_seed(0)
    x, branch = torch.randn(5, 32, generator=gen, dtype=torch.float64), torch.randn(5, 32, generator=gen, dtype=torch.float64)
    mapping = mappings.sparse(32, density=0.5, block=8, seed=1, dtype=torch.float64)
    expected = entskip.skip_add(x, mapping, branch, 0.6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = entskip.skip_add(x, mapping, branch, 0.6)
    assert y.dtype == torch.float64 and torch.equal(y, expected)


def test_without_autocast_dtypes_must_still_match():
    x, branch = torch.randn(5, 32), torch.randn(5, 32, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="branch has dtype torch.bfloat16 but x has dtype torch.float32"):
        entskip.skip_add(x, None, branch)


def _vit_run(device, autocast_dtype):
    """A converted ViT's logits and parameter gradients on a fixed seeded batch."""
    torch.manual_seed(0)
    model = models.ViT(image_size=8, patch_size=4, num_classes=5, dim=32, depth=2, num_heads=2)
    entskip.entangle(model, "sparse", density=0.5, block=8, construction="random", learnable=True, learnable_alpha=True, alpha_min=0.8)
    model.to(device)
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(6, 3, 8, 8, generator=gen).to(device), torch.randint(0, 5, (6,), generator=gen).to(device)
    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(x)
    F.cross_entropy(logits.float(), target).backward()
    return logits, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("device, dtype", SETTINGS)
def test_converted_vit_trains_under_autocast(device, dtype):
    logits, grads = _vit_run(device, dtype)
    logits_ref, grads_ref = _vit_run(device, None)
    assert logits.dtype == dtype
    # Several low-precision layers deep: compare each gradient as a whole (relative
    # Frobenius error) at a few units of the dtype's rounding (bf16 2^-8, fp16 2^-11).
    # (A conv net with batch norm is left out: its bf16 gradients are off by 10-20 %
    # with plain `x + r` skips already, so it would test torch's convolutions.)
    tol = 8 * torch.finfo(dtype).eps
    for pname, grad in grads.items():
        ref = grads_ref[pname]
        err = float((grad - ref).norm() / ref.norm().clamp_min(1e-12))
        assert err < tol, f"grad {pname}: relative error {err:.3g} >= {tol:.3g}"


def test_compiled_skip_under_autocast_runs_in_the_autocast_dtype():
    torch._dynamo.reset()
    skip = entskip.EntangledSkip(32, "sparse", alpha=0.8, density=0.5, block=8)
    linear = torch.nn.Linear(32, 32)
    compiled = torch.compile(lambda x: skip(x, linear(x)), fullgraph=True)
    x = torch.randn(3, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = compiled(x), skip(x, linear(x))
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), expected.float(), torch.bfloat16, "compiled vs eager")
    assert compiled(x).dtype == torch.float32  # autocast off again: a recompile, not a stale graph
