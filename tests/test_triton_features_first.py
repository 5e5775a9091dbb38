"""The Triton kernels on features-first activations, against a float64 einsum reference.

Features-first: ``x (N, D_in, S)`` (``NCHW`` viewed as ``(N, C, H*W)``), ``branch``/``y``/
``grad`` ``(N, D_out, S)``, ``dx (N, D_in, S)``; per image ``y[n] = alpha * M @ x[n] + branch[n]``,
so ``dx[n] = alpha * M^T @ g[n]``, ``dM = alpha * sum_n g[n] @ x[n]^T`` (BSR: on the stored
blocks only) and ``dalpha = sum(g * (M @ x))``. The reference is plain torch ``einsum`` in
float64 with autograd (independent of :mod:`entskip.reference`, which is features-last).

The tests call the launchers (``entskip.triton_kernels.{bsr_skip,dense_skip}.forward/backward``)
after the argument checks of :mod:`entskip.gpu_dispatch`, as the ops' CUDA implementation
does. Without a GPU they run in the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest) on CPU tensors, on small shapes; outputs are poisoned (``poisoned``: new tensors
are NaN), so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import os

import pytest
import torch

from entskip import gpu_dispatch

from conftest import assert_close, random_layout

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
pytestmark = [
    pytest.mark.skipif(not gpu_dispatch.triton_available(), reason="triton is not installed"),
    pytest.mark.skipif(not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or TRITON_INTERPRET=1"),
]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SPATIAL = [1, 7, 15, 49]  # off every tile size; 49 = 7 x 7
# (images N, block b, block rows R, block columns C): D_out = R * b != D_in = C * b.
BSR_SHAPES = [(1, 16, 3, 2), (3, 32, 2, 3), (2, 64, 1, 2)]
# (images N, D_in, D_out): D_in off the K tile.
DENSE_SHAPES = [(1, 64, 48), (3, 100, 72)]


def _kernels():
    return gpu_dispatch.triton_kernels()


def _rand(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def _inputs(n, d_in, d_out, s, dtype, seed):
    """Fresh random ``x (n, d_in, s)``, ``branch``, ``grad (n, d_out, s)`` and a 0-d alpha."""
    gen = torch.Generator().manual_seed(seed)
    alpha = torch.tensor(0.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    return _rand(gen, n, d_in, s, dtype=dtype), _rand(gen, n, d_out, s, dtype=dtype), \
        _rand(gen, n, d_out, s, dtype=dtype), alpha


def _bsr_layout(rows, cols, b, seed):
    """A random rectangular layout with an empty block row when there are several."""
    layout = random_layout(rows * b, cols * b, b, 0.6, seed=seed, empty_row=rows > 1).to(DEVICE)
    values = _rand(torch.Generator().manual_seed(seed + 1), layout.nnzb, b, b, dtype=torch.float64)
    return layout, values


def _einsum_reference(matrix_of, stored, x, branch, grad, alpha):
    """Float64 ``y[n] = alpha * M @ x[n] + branch[n]`` and ``(dx, d stored, dalpha)`` for
    ``M = matrix_of(stored)`` by autograd."""
    x64, stored64, alpha64 = (t.detach().double().requires_grad_(True) for t in (x, stored, alpha))
    y = alpha64 * torch.einsum("oi,nis->nos", matrix_of(stored64), x64)
    if branch is not None:
        y = y + branch.double()
    y.backward(grad.double())
    return y.detach(), (x64.grad, stored64.grad, alpha64.grad)


def _check_against_reference(y, grads, y_ref, grads_ref, dtype, x, grad, matrix, alpha):
    n, s = x.shape[0], x.shape[2]
    assert y.dtype == dtype and grads[0].dtype == dtype
    assert y.is_contiguous() and grads[0].is_contiguous()
    assert_close(y, y_ref, dtype, "y")
    assert_close(grads[0], grads_ref[0], dtype, "dx")
    # dM sums N * S products per element: its error grows with the square root of their count
    assert_close(grads[1], grads_ref[1], dtype, "dM", scale=max(n * s, 1) ** 0.5 * 4)
    # dalpha sums N * D_out * S * D_in products that cancel: its scale is the sum of their magnitudes
    dalpha_scale = (grad.double().abs() * torch.einsum("oi,nis->nos", matrix.double().abs(), x.double().abs())).sum()
    assert grads[2].shape == () and grads[2].dtype == alpha.dtype
    assert_close(grads[2], grads_ref[2], dtype, "dalpha", scale=max(float(dalpha_scale), 1.0))


def _bsr_run(x, values, layout, alpha, branch, grad, mask=(True, True, True)):
    tensors = layout.tensors()
    gpu_dispatch.check_bsr(x, values, *tensors, alpha, branch=branch, block_sizes=gpu_dispatch.TRITON_BLOCKS)
    gpu_dispatch.check_bsr(x, values, *tensors, alpha, grad=grad, block_sizes=gpu_dispatch.TRITON_BLOCKS)
    gpu_dispatch.validate_layout(*tensors, values.shape[-1])
    y = _kernels().bsr_skip.forward(x, values, layout.crow_indices, layout.col_indices, alpha, branch)
    return y, _kernels().bsr_skip.backward(grad, x, values, *tensors, alpha, list(mask))


def _dense_run(x, weight, alpha, branch, grad, mask=(True, True, True)):
    gpu_dispatch.check_dense(x, weight, alpha, branch=branch)
    gpu_dispatch.check_dense(x, weight, alpha, grad=grad)
    return _kernels().dense_skip.forward(x, weight, alpha, branch), \
        _kernels().dense_skip.backward(grad, x, weight, alpha, list(mask))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", SPATIAL, ids=lambda s: f"S{s}")
@pytest.mark.parametrize("shape", BSR_SHAPES, ids=str)
def test_bsr_matches_einsum_reference(poisoned, dtype, s, shape):
    n, b, rows, cols = shape
    layout, values64 = _bsr_layout(rows, cols, b, seed=n + b + s)
    values = values64.to(dtype)
    x, branch, grad, alpha = _inputs(n, cols * b, rows * b, s, dtype, seed=s + b)
    y, grads = _bsr_run(x, values, layout, alpha, branch, grad)
    y_ref, grads_ref = _einsum_reference(layout.to_dense, values, x, branch, grad, alpha)
    assert y.shape == (n, rows * b, s) and grads[0].shape == x.shape and grads[1].shape == values.shape
    _check_against_reference(y, grads, y_ref, grads_ref, dtype, x, grad, layout.to_dense(values), alpha)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", SPATIAL, ids=lambda s: f"S{s}")
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
def test_dense_matches_einsum_reference(poisoned, dtype, s, shape):
    n, d_in, d_out = shape
    x, branch, grad, alpha = _inputs(n, d_in, d_out, s, dtype, seed=s + d_in)
    gen = torch.Generator().manual_seed(s)
    weight = (_rand(gen, d_out, d_in, dtype=torch.float64) / d_in**0.5).to(dtype)
    y, grads = _dense_run(x, weight, alpha, branch, grad)
    y_ref, grads_ref = _einsum_reference(lambda w: w, weight, x, branch, grad, alpha)
    assert y.shape == (n, d_out, s) and grads[0].shape == x.shape and grads[1].shape == weight.shape
    _check_against_reference(y, grads, y_ref, grads_ref, dtype, x, grad, weight, alpha)


def test_dense_launches_more_images_than_a_grid_axis_holds(poisoned, monkeypatch):
    """More images than CUDA's grid axis 1 allows (65535; lowered to 2 here) run in slices."""
    monkeypatch.setattr(_kernels().dense_skip, "MAX_IMAGES", 2)
    x, branch, grad, alpha = _inputs(5, 32, 48, 7, torch.float64, seed=11)
    weight = _rand(torch.Generator().manual_seed(12), 48, 32, dtype=torch.float64) / 32**0.5
    y, grads = _dense_run(x, weight, alpha, branch, grad)
    y_ref, grads_ref = _einsum_reference(lambda w: w, weight, x, branch, grad, alpha)
    _check_against_reference(y, grads, y_ref, grads_ref, torch.float64, x, grad, weight, alpha)


def test_without_branch(poisoned):
    """``branch=None``: the pure skip product, both families."""
    layout, values = _bsr_layout(2, 2, 16, seed=3)
    x, _, grad, alpha = _inputs(2, 32, 32, 15, torch.float64, seed=4)
    y, _ = _bsr_run(x, values, layout, alpha, None, grad, mask=(True, False, False))
    assert_close(y, _einsum_reference(layout.to_dense, values, x, None, grad, alpha)[0], torch.float64, "bsr y")
    weight = layout.to_dense(values)
    y, _ = _dense_run(x, weight, alpha, None, grad, mask=(True, False, False))
    assert_close(y, _einsum_reference(lambda w: w, weight, x, None, grad, alpha)[0], torch.float64, "dense y")


@pytest.mark.parametrize("n, s", [(0, 7), (3, 0)], ids=["N0", "S0"])
def test_empty_activations(poisoned, n, s):
    """No positions: empty ``y`` and ``dx`` of the right shapes, ``dM`` and ``dalpha`` zero."""
    layout, values = _bsr_layout(2, 3, 16, seed=5)
    x, branch, grad, alpha = _inputs(n, 48, 32, s, torch.float32, seed=6)
    values = values.float()
    for y, (dx, dm, da), stored in [(*_bsr_run(x, values, layout, alpha, branch, grad), values),
                                    (*_dense_run(x, layout.to_dense(values), alpha, branch, grad), None)]:
        assert y.shape == (n, 32, s) and dx.shape == (n, 48, s)
        assert dm.shape == (values.shape if stored is not None else (32, 48))
        assert torch.equal(dm, torch.zeros_like(dm)) and float(da) == 0.0


def test_backward_output_mask():
    layout, values = _bsr_layout(2, 2, 16, seed=7)
    x, _, grad, alpha = _inputs(2, 32, 32, 7, torch.float32, seed=8)
    values = values.float()
    for mask in [(True, False, False), (False, True, False), (False, False, True)]:
        for _, got in (_bsr_run(x, values, layout, alpha, None, grad, mask),
                       _dense_run(x, layout.to_dense(values), alpha, None, grad, mask)):
            assert [t is not None for t in got] == list(mask)


def test_backward_is_deterministic():
    """The sampled product over (image, position) tiles sums fixed-order partials: two runs
    are bitwise equal (SPLIT > 1 here: 4 images of 49 positions)."""
    layout, values = _bsr_layout(2, 2, 16, seed=9)
    x, _, grad, alpha = _inputs(4, 32, 32, 49, torch.float32, seed=10)
    values = values.float()
    runs = [_bsr_run(x, values, layout, alpha, None, grad)[1] for _ in range(2)]
    runs += [_dense_run(x, layout.to_dense(values), alpha, None, grad)[1] for _ in range(2)]
    for a, b in zip(*runs[:2]):
        assert torch.equal(a, b)
    for a, b in zip(*runs[2:]):
        assert torch.equal(a, b)


def test_matches_features_last_kernels():
    """Features-first equals the features-last kernels on the same positions moved last
    (``x.transpose(1, 2)`` flattened to rows), to float32 rounding."""
    layout, values = _bsr_layout(3, 2, 16, seed=11)
    x, branch, grad, alpha = _inputs(3, 32, 48, 7, torch.float32, seed=12)
    values = values.float()

    def last(t):
        return t.transpose(1, 2).reshape(-1, t.shape[1]).contiguous()

    def first(t, like):
        return t.reshape(like.shape[0], like.shape[2], -1).transpose(1, 2)

    y, (dx, dv, da) = _bsr_run(x, values, layout, alpha, branch, grad)
    y2, (dx2, dv2, da2) = _bsr_run(last(x), values, layout, alpha, last(branch), last(grad))
    assert_close(y, first(y2, y), torch.float32, "y")
    assert_close(dx, first(dx2, dx), torch.float32, "dx")
    assert_close(dv, dv2, torch.float32, "dvalues", scale=float(dv2.abs().max()) * 4)
    assert_close(da, da2, torch.float32, "dalpha", scale=float(da2.abs()) * 4)


def test_every_config_runs_features_first(monkeypatch):
    """With ``ENTSKIP_AUTOTUNE=once`` every config that fits runs once, features-first."""
    monkeypatch.setenv("ENTSKIP_AUTOTUNE", "once")
    bsr = _kernels().bsr_skip
    layout, values = _bsr_layout(2, 2, 16, seed=13)
    x, branch, grad, alpha = _inputs(2, 32, 32, 15, torch.float32, seed=14)
    values = values.float()
    kernels = (bsr._block_row_kernel, bsr._sampled_kernel, _kernels().dense_skip._matmul_kernel)
    for kernel in kernels:
        kernel.cache.clear()
    _bsr_run(x, values, layout, alpha, branch, grad)
    _dense_run(x, layout.to_dense(values), alpha, branch, grad)
    # the last key each kernel tuned: dx, the sampled product, dW (float32 FMA: the same configs fit);
    # features-first: S = 15 and N = 2 images
    args = {"a_ptr": x, "B": 16, "PRECISION": "ieee", "HAS_DOT": True, "S_KEY": 16, "L_KEY": 2}
    for kernel, fits in zip(kernels, (bsr.block_row_fits, bsr.sampled_fits, _kernels().dense_skip.matmul_fits)):
        expected = {c for c in kernel.configs if fits(c, args)}
        assert len(expected) >= 3 and set(kernel.configs_timings) == expected, kernel


def test_tile_offsets_limit_is_checked():
    """An image too large for the 32-bit tile offsets is refused before any launch."""
    bsr = _kernels().bsr_skip
    bsr._check_tile_offsets(torch.empty(1, 32, 2**25, device="meta"), 256)  # 2**30 + 256 elements: fits
    with pytest.raises(ValueError, match=r"need 256 positions of all 32 features within 2\*\*31"):
        bsr._check_tile_offsets(torch.empty(1, 32, 2**26, device="meta"), 256)


# ---- argument checks: clear errors naming the argument, before any kernel ----

def _bsr_args(n=2, s=7):
    layout, values = _bsr_layout(2, 3, 16, seed=15)
    x, branch, grad, alpha = _inputs(n, 48, 32, s, torch.float64, seed=16)
    return x, values, layout.tensors(), alpha, branch, grad


@pytest.mark.parametrize("case, error, match", [
    ("branch_spatial", ValueError, r"branch must have shape \(2, 32, 7\), \(N, D_out, S\) like x \(N, D_in, S\), got \(2, 32, 8\)"),
    ("branch_2d", ValueError, r"branch must have shape \(2, 32, 7\)"),
    ("grad_images", ValueError, r"grad must have shape \(2, 32, 7\)"),
    ("x_features", ValueError, r"x has 32 features but the layout has 3 block columns of 16 \(48 features\)"),
    ("x_indivisible", ValueError, r"x has 40 features, not divisible by the block size 16"),
    ("x_4d", ValueError, r"x must be 2-D \(rows, D_in\) features-last or 3-D \(N, D_in, S\) features-first"),
    ("x_strided", ValueError, r"x must be contiguous"),
    ("branch_strided", ValueError, r"branch must be contiguous"),
    ("branch_dtype", TypeError, r"branch has dtype torch.float32 but x has dtype torch.float64"),
])
def test_bsr_bad_features_first_arguments(case, error, match):
    x, values, tensors, alpha, branch, grad = _bsr_args()
    kw = {"branch": branch, "grad": None}
    if case == "branch_spatial":
        kw["branch"] = torch.randn(2, 32, 8, dtype=torch.float64)
    elif case == "branch_2d":
        kw["branch"] = branch[:, :, 0].contiguous()
    elif case == "grad_images":
        kw.update(branch=None, grad=grad[:1].contiguous())
    elif case == "x_features":
        x = x[:, :32].contiguous()
    elif case == "x_indivisible":
        x = x[:, :40].contiguous()
    elif case == "x_4d":
        x = x[..., None]
    elif case == "x_strided":  # channels-last memory in the (N, D, S) shape
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "branch_strided":
        kw["branch"] = branch.transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "branch_dtype":
        kw["branch"] = branch.float()
    with pytest.raises(error, match=match):
        gpu_dispatch.check_bsr(x, values, *tensors, alpha, block_sizes=gpu_dispatch.TRITON_BLOCKS, **kw)


@pytest.mark.parametrize("case, error, match", [
    ("weight", ValueError, r"weight must have 48 columns \(x's features\), got shape \(32, 40\)"),
    ("branch", ValueError, r"branch must have shape \(2, 32, 7\), \(N, D_out, S\) like x \(N, D_in, S\), got \(2, 48, 7\)"),
    ("grad", ValueError, r"grad must have shape \(2, 32, 7\)"),
    ("x_strided", ValueError, r"x must be contiguous"),
    ("grad_strided", ValueError, r"grad must be contiguous"),
])
def test_dense_bad_features_first_arguments(case, error, match):
    x, _, _, alpha, branch, grad = _bsr_args()
    weight = torch.randn(32, 48, dtype=torch.float64)
    kw = {"branch": branch}
    if case == "weight":
        weight = weight[:, :40].contiguous()
    elif case == "branch":
        kw["branch"] = x.clone()
    elif case == "grad":
        kw = {"grad": grad[:, :, :6].contiguous()}
    elif case == "x_strided":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "grad_strided":
        kw = {"grad": grad.transpose(1, 2).contiguous().transpose(1, 2)}
    with pytest.raises(error, match=match):
        gpu_dispatch.check_dense(x, weight, alpha, **kw)


def test_features_last_checks_unchanged():
    """2-D calls keep their contract: a 3-D branch for a 2-D x names the expected 2-D shape."""
    x, values, tensors, alpha, branch, _ = _bsr_args()
    x2 = x[:, :, 0].contiguous()
    gpu_dispatch.check_bsr(x2, values, *tensors, alpha, branch=branch[:, :, 0].contiguous())
    with pytest.raises(ValueError, match=r"branch must have shape \(2, 32\), \(rows, D_out\) like x \(rows, D_in\)"):
        gpu_dispatch.check_bsr(x2, values, *tensors, alpha, branch=branch)


def test_layout_keys_choose_the_configs():
    """The fits rules read the layout from the autotune keys (S_KEY, L_KEY: 0 features-last):
    each kernel's key holds it, and float32 FMA dots get a different config set per layout
    (features-first tiles are smaller: docs/gpu.md)."""
    bsr, dense = _kernels().bsr_skip, _kernels().dense_skip
    x = torch.empty(0, dtype=torch.float32)
    for kernel, fits, key in [(bsr._block_row_kernel, bsr.block_row_fits, "S_KEY"),
                              (bsr._sampled_kernel, bsr.sampled_fits, "S_KEY"),
                              (dense._matmul_kernel, dense.matmul_fits, "L_KEY")]:
        assert key in kernel.keys
        for block in (16, 32, 64):
            chosen = [{c for c in kernel.configs
                       if fits(c, {"a_ptr": x, "B": block, "PRECISION": "ieee", "HAS_DOT": False, key: layout})}
                      for layout in (0, 16)]
            assert chosen[0] and chosen[1] and chosen[0] != chosen[1], (kernel, block)
