"""The ``triton`` backend against the float64 reference, forward and every gradient.

Without a GPU the Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set by
conftest) on CPU tensors, on small shapes, through :func:`entskip.bsr_skip.gpu_forward`
and friends: the CUDA implementation of the ops minus the dispatcher. On a GPU the
same tests run natively on a larger grid, plus the public API, ``opcheck``,
``torch.compile(fullgraph=True)`` and CUDA graph capture.
"""

from __future__ import annotations

import os

import pytest
import torch

import entskip
from entskip import bsr_skip, dense_skip, gpu_dispatch, reference

from conftest import assert_close, random_layout

pytestmark = pytest.mark.skipif(not gpu_dispatch.triton_available(), reason="triton is not installed")

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (rows N, block b, block rows R, block columns C): N off every tile size; D = C * b <= 128 on the CPU.
BSR_SHAPES = [(1, 16, 2, 3), (37, 32, 3, 4), (70, 64, 2, 2), (130, 16, 8, 8)]
DENSE_SHAPES = [(1, 64, 64), (37, 100, 72), (130, 48, 128)]
if ON_GPU:
    BSR_SHAPES += [(1000, 32, 32, 32), (4099, 64, 16, 16), (16384, 32, 128, 128)]
    DENSE_SHAPES += [(1000, 1024, 1024), (4099, 4096, 1024)]
pytestmark = [pytestmark, pytest.mark.skipif(not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1",
                                             reason="needs a GPU or TRITON_INTERPRET=1")]


def _inputs(n, d_in, d_out, dtype, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)

    alpha = torch.tensor(0.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    return rand(n, d_in), rand(n, d_out), rand(n, d_out), alpha


REFERENCE_CHUNK_ELEMENTS = 1 << 26  # float64 elements of one reference intermediate (512 MiB)


def _reference_grads(fn, x, matrix, alpha, branch, grad, row_elements=0, chunk_elements=REFERENCE_CHUNK_ELEMENTS):
    """Forward and (dx, dM, dalpha) of ``fn`` in float64 autograd, over chunks of rows so
    that no intermediate holds more than ``chunk_elements`` (``row_elements``: the largest
    intermediate's elements per row, e.g. the BSR reference's gathered blocks ``nnzb * b``).
    ``y`` and ``dx`` are row-wise; ``dM`` and ``dalpha`` accumulate over the chunks."""
    step = max(1, chunk_elements // max(row_elements, x.shape[1], grad.shape[1], 1))
    matrix, alpha = (t.detach().double().requires_grad_(True) for t in (matrix, alpha))
    ys, dxs = [], []
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        x_rows = x[rows].detach().double().requires_grad_(True)
        y = fn(x_rows, matrix, None if branch is None else branch[rows].double(), alpha)
        y.backward(grad[rows].double())
        ys.append(y.detach())
        dxs.append(x_rows.grad)
    return torch.cat(ys), (torch.cat(dxs), matrix.grad, alpha.grad)


def test_chunked_reference_matches_one_chunk():
    """The reference over row chunks (GPU shapes) equals the reference over all rows at once."""
    layout = random_layout(64, 96, 16, 0.5, seed=1)
    x, branch, grad, alpha = (t.cpu() for t in _inputs(37, 96, 64, torch.float64, seed=2))
    values = torch.randn(layout.nnzb, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def fn(x_, v_, branch_, a_):
        return reference.bsr_skip_add(x_, v_, layout.crow_indices, layout.col_indices, branch_, a_)

    whole = _reference_grads(fn, x, values, alpha, branch, grad)
    chunked = _reference_grads(fn, x, values, alpha, branch, grad, row_elements=layout.nnzb * 16,
                               chunk_elements=8 * layout.nnzb * 16)  # 8 rows a chunk: 5 chunks
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1][0], whole[1][0])
    for got, expected in zip(chunked[1][1:], whole[1][1:]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["bsr_skip_add", "bsr_skip_add_backward", "dense_skip_add", "dense_skip_add_backward"])
def test_public_ops_have_one_cuda_implementation(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"entskip::{op}", "CUDA")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BSR_SHAPES, ids=str)
@pytest.mark.parametrize("with_branch", [True, False], ids=["branch", "no_branch"])
def test_bsr_matches_reference(poisoned, dtype, shape, with_branch):
    n, b, rows, cols = shape
    layout = random_layout(rows * b, cols * b, b, 0.5, seed=n, empty_row=rows > 2).to(DEVICE)
    x, branch, grad, alpha = _inputs(n, cols * b, rows * b, dtype, seed=n + b)
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(layout.nnzb, b, b, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    branch = branch if with_branch else None
    tensors = layout.tensors()

    y = bsr_skip.gpu_forward(x, values, *tensors, alpha, branch, backend="triton")
    grads = bsr_skip.gpu_backward(grad, x, values, *tensors, alpha, [True, True, True], backend="triton")

    def fn(x_, v_, branch_, a_):
        return reference.bsr_skip_add(x_, v_, layout.crow_indices, layout.col_indices, branch_, a_)

    y_ref, grads_ref = _reference_grads(fn, x, values, alpha, branch, grad, row_elements=layout.nnzb * b)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "y")
    assert_close(grads[0], grads_ref[0], dtype, "dx")
    assert_close(grads[1], grads_ref[1], dtype, "dvalues", scale=max(n, 1) ** 0.5 * 4)
    # dalpha sums N * D_out * b products that cancel: its scale is the sum of their magnitudes
    dalpha_scale = (grad.double().abs() * (x.double().abs() @ layout.to_dense(values.double().abs()).T)).sum()
    assert grads[2].shape == alpha.shape and grads[2].dtype == alpha.dtype
    assert_close(grads[2], grads_ref[2], dtype, "dalpha", scale=max(float(dalpha_scale), 1.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=str)
@pytest.mark.parametrize("with_branch", [True, False], ids=["branch", "no_branch"])
def test_dense_matches_reference(poisoned, dtype, shape, with_branch):
    n, d_in, d_out = shape
    x, branch, grad, alpha = _inputs(n, d_in, d_out, dtype, seed=n)
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / d_in**0.5).to(dtype).to(DEVICE)
    branch = branch if with_branch else None

    y = dense_skip.gpu_forward(x, weight, alpha, branch, backend="triton")
    grads = dense_skip.gpu_backward(grad, x, weight, alpha, [True, True, True], backend="triton")
    y_ref, grads_ref = _reference_grads(reference.skip_add, x, weight, alpha, branch, grad)
    assert_close(y, y_ref, dtype, "y")
    assert_close(grads[0], grads_ref[0], dtype, "dx")
    assert_close(grads[1], grads_ref[1], dtype, "dW", scale=max(n, 1) ** 0.5 * 4)
    dalpha_scale = (grad.double().abs() * (x.double().abs() @ weight.double().abs().T)).sum()
    assert_close(grads[2], grads_ref[2], dtype, "dalpha", scale=max(float(dalpha_scale), 1.0))


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True)], ids=str)
def test_backward_output_mask(mask, sparse_layout):
    layout, values = sparse_layout
    x, _, grad, alpha = _inputs(5, layout.shape[1], layout.shape[0], torch.float32, seed=3)
    for got in (
        bsr_skip.gpu_backward(grad, x, values, *layout.tensors(), alpha, list(mask), backend="triton"),
        dense_skip.gpu_backward(grad, x, layout.to_dense(values), alpha, list(mask), backend="triton"),
    ):
        assert [t is not None for t in got] == list(mask)


@pytest.fixture
def sparse_layout():
    layout = random_layout(64, 64, 16, 0.5, seed=4).to(DEVICE)
    gen = torch.Generator().manual_seed(5)
    return layout, torch.randn(layout.nnzb, 16, 16, generator=gen).to(DEVICE)


def test_backward_is_deterministic(sparse_layout):
    layout, values = sparse_layout
    x, _, grad, alpha = _inputs(300, 64, 64, torch.float32, seed=6)
    runs = [bsr_skip.gpu_backward(grad, x, values, *layout.tensors(), alpha, [True, True, True], backend="triton")
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_empty_inputs(sparse_layout):
    layout, values = sparse_layout
    x, branch, grad, alpha = _inputs(0, 64, 64, torch.float32, seed=7)
    assert bsr_skip.gpu_forward(x, values, *layout.tensors(), alpha, branch, backend="triton").shape == (0, 64)
    dx, dv, da = bsr_skip.gpu_backward(grad, x, values, *layout.tensors(), alpha, [True, True, True], backend="triton")
    assert dx.shape == (0, 64) and torch.equal(dv, torch.zeros_like(dv)) and float(da) == 0.0
    empty = random_layout(64, 64, 16, 0.0, seed=0).to(DEVICE)
    x, branch, grad, alpha = _inputs(9, 64, 64, torch.float32, seed=8)
    y = bsr_skip.gpu_forward(x, values[:0], *empty.tensors(), alpha, branch, backend="triton")
    assert torch.equal(y, branch)  # no stored block: only the residual


def test_every_shipped_config_runs(sparse_layout, monkeypatch):
    """With ``ENTSKIP_AUTOTUNE=once`` (the interpreter's default) the autotuner runs each
    config that fits once (no timing)."""
    monkeypatch.setenv("ENTSKIP_AUTOTUNE", "once")
    layout, values = sparse_layout
    x, branch, _, alpha = _inputs(40, 64, 64, torch.float32, seed=9)
    kernel = entskip.gpu_dispatch.triton_kernels().bsr_skip._block_row_kernel
    kernel.cache.clear()
    bsr_skip.gpu_forward(x, values, *layout.tensors(), alpha, branch, backend="triton")
    fits = entskip.gpu_dispatch.triton_kernels().bsr_skip.block_row_fits
    expected = [c for c in kernel.configs if fits(c, {"a_ptr": x, "B": 16, "PRECISION": "ieee"})]
    assert len(expected) >= 3 and set(kernel.configs_timings) == set(expected)


def test_argument_errors(sparse_layout):
    layout, values = sparse_layout
    x, branch, _, alpha = _inputs(4, 64, 64, torch.float32, seed=10)
    t = layout.tensors()
    with pytest.raises(TypeError, match="values has dtype torch.float64 but x has dtype torch.float32"):
        bsr_skip.gpu_forward(x, values.double(), *t, alpha, branch, backend="triton")
    with pytest.raises(ValueError, match="block size 8 is not supported"):
        small = random_layout(64, 64, 8, 0.5, seed=1).to(DEVICE)
        bsr_skip.gpu_forward(x, torch.randn(small.nnzb, 8, 8, device=DEVICE), *small.tensors(), alpha, branch,
                             backend="triton")
    with pytest.raises(ValueError, match="branch must have shape"):
        bsr_skip.gpu_forward(x, values, *t, alpha, branch[:, :32].contiguous(), backend="triton")
    with pytest.raises(ValueError, match="alpha must be a 0-d floating tensor"):
        bsr_skip.gpu_forward(x, values, *t, alpha.reshape(1), branch, backend="triton")
    with pytest.raises(ValueError, match="col_indices must be a contiguous 1-D int64"):
        bsr_skip.gpu_forward(x, values, t[0], t[1].int(), *t[2:], alpha, branch, backend="triton")
    with pytest.raises(ValueError, match="weight must have 64 columns"):
        dense_skip.gpu_forward(x, torch.randn(64, 32, device=DEVICE), alpha, branch, backend="triton")
    with pytest.raises(ValueError, match="x must be contiguous"):
        dense_skip.gpu_forward(x.t(), torch.randn(64, 4, device=DEVICE), alpha, None, backend="triton")


def test_invalid_layout_never_reaches_a_kernel(sparse_layout):
    layout, values = sparse_layout
    x, branch, _, alpha = _inputs(4, 64, 64, torch.float32, seed=11)
    crow, col, ccol, row, perm = (t.clone() for t in layout.tensors())
    col[0] = 4  # out of range: 4 block columns
    with pytest.raises(ValueError, match="col_indices must lie in"):
        bsr_skip.gpu_forward(x, values, crow, col, ccol, row, perm, alpha, branch, backend="triton")
    crow, col, ccol, row, perm = (t.clone() for t in layout.tensors())
    perm[[0, 1]] = perm[[1, 0]]
    with pytest.raises(ValueError, match="perm does not describe the transpose"):
        bsr_skip.gpu_forward(x, values, crow, col, ccol, row, perm, alpha, branch, backend="triton")


def test_layout_is_validated_once_per_layout(sparse_layout, monkeypatch):
    layout, values = sparse_layout
    x, branch, _, alpha = _inputs(4, 64, 64, torch.float32, seed=12)
    tensors = tuple(t.clone() for t in layout.tensors())
    calls = []
    real = entskip.layout.BlockLayout.__init__
    monkeypatch.setattr(entskip.layout.BlockLayout, "__init__", lambda self, *a: calls.append(1) or real(self, *a))
    for _ in range(3):
        bsr_skip.gpu_forward(x, values, *tensors, alpha, branch, backend="triton")
    assert calls == [1]
    tensors[1][0] = tensors[1][0]  # an in-place write bumps the version: validated again
    bsr_skip.gpu_forward(x, values, *tensors, alpha, branch, backend="triton")
    assert calls == [1, 1]


gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")


@gpu_only
@pytest.mark.parametrize("kind", ["sparse", "orthogonal"])
def test_public_api_autograd_compile_and_graphs(kind):
    mapping = entskip.mappings.make(kind, 256, density=0.25, block=32).to(DEVICE) if kind == "sparse" else \
        entskip.mappings.orthogonal(256).to(DEVICE)
    x, branch, grad, _ = _inputs(300, 256, 256, torch.bfloat16, seed=13)
    alpha = torch.tensor(0.8, device=DEVICE, requires_grad=True)
    with entskip.use_backend("reference"):
        y_ref = entskip.skip_add(x.double(), mapping.double(), branch.double(), alpha.double())
    with entskip.use_backend("triton"):
        y = entskip.skip_add(x, mapping.to(torch.bfloat16), branch, alpha)
        assert_close(y, y_ref, torch.bfloat16, "y")
        compiled = torch.compile(lambda a, r: entskip.skip_add(a, mapping.to(torch.bfloat16), r, alpha), fullgraph=True)
        assert_close(compiled(x, branch), y_ref, torch.bfloat16, "compiled y")
        static_x = x.clone()
        out = entskip.skip_add(static_x, mapping.to(torch.bfloat16), branch, alpha.detach())  # warm-up: tune, validate
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = entskip.skip_add(static_x, mapping.to(torch.bfloat16), branch, alpha.detach())
        static_x.copy_(x)
        graph.replay()
        assert_close(out, y_ref, torch.bfloat16, "graph replay y")


@gpu_only
def test_opcheck():
    layout = random_layout(128, 128, 32, 0.5, seed=14).to(DEVICE)
    x, branch, _, alpha = _inputs(64, 128, 128, torch.float32, seed=15)
    values = torch.randn(layout.nnzb, 32, 32, device=DEVICE)
    with entskip.use_backend("triton"):
        torch.library.opcheck(torch.ops.entskip.bsr_skip_add.default,
                              (x.requires_grad_(), values.requires_grad_(), *layout.tensors(), alpha, branch))
        torch.library.opcheck(torch.ops.entskip.dense_skip_add.default,
                              (x, torch.randn(128, 128, device=DEVICE, requires_grad=True), alpha, branch))


@gpu_only
def test_float32_is_not_tf32_unless_allowed():
    x, _, _, alpha = _inputs(512, 1024, 1024, torch.float32, seed=16)
    weight = torch.randn(1024, 1024, device=DEVICE) / 32
    assert not torch.backends.cuda.matmul.allow_tf32
    y = dense_skip.gpu_forward(x, weight, alpha, None, backend="triton")
    assert_close(y, reference.skip_add(x.double(), weight.double(), None, alpha.double()), torch.float32, "y")


@gpu_only
def test_64bit_indexing():
    n, d = (1 << 31) // 1024 + 64, 1024  # N * D > 2**31
    layout = random_layout(d, d, 32, 1 / 16, seed=17).to(DEVICE)
    x = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16)
    values = torch.randn(layout.nnzb, 32, 32, device=DEVICE, dtype=torch.bfloat16)
    alpha = torch.tensor(1.0, device=DEVICE)
    y = bsr_skip.gpu_forward(x, values, *layout.tensors(), alpha, None, backend="triton")
    tail = slice(n - 100, n)
    expected = reference.bsr_skip_add(x[tail], values, layout.crow_indices, layout.col_indices, None, alpha)
    assert_close(y[tail], expected, torch.bfloat16, "last rows")
