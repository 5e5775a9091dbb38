"""The ``cuda`` backend (``csrc/cuda/``) against the float64 reference, forward and every gradient.

Runs only on a CUDA GPU with entskip built with its CUDA kernels, and is skipped (never
passed) elsewhere. The reference runs in float64 on the CPU on the same (rounded) inputs.
Outputs are poisoned (``torch.use_deterministic_algorithms`` fills every fresh tensor with
NaN), so an element a kernel forgets to write fails.

Under compute-sanitizer (bench/gpu_check.sh B) set ``ENTSKIP_SANITIZE=1``: a smaller grid that
still covers every dtype, block size, path (tensor core, SIMT, generic, unaligned, cuBLASLt)
and row tail (without the caching allocator, so memcheck sees each tensor's own bounds)::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 ENTSKIP_SANITIZE=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python -m pytest tests/test_cuda_backend.py -q -x -k "not 2_31 and not graph and not compile"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 ENTSKIP_SANITIZE=1 compute-sanitizer --tool racecheck --error-exitcode 1 \\
        python -m pytest tests/test_cuda_backend.py -q -x -k "not 2_31 and not graph and not compile"
"""

from __future__ import annotations

import os

import pytest
import torch

import entskip
from entskip import gpu_dispatch, mappings, reference

from conftest import assert_close, random_layout

HAS_KERNELS = torch.cuda.is_available() and gpu_dispatch.cuda_kernels_available()
pytestmark = pytest.mark.skipif(
    not HAS_KERNELS,
    reason="needs a CUDA GPU and entskip built with its CUDA kernels (csrc/cuda)"
    if torch.cuda.is_available()
    else "needs a CUDA GPU",
)
DEVICE = torch.device("cuda")
OPS = torch.ops.entskip
SANITIZE = os.environ.get("ENTSKIP_SANITIZE") == "1"

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (block, D_in, D_out): the tiled block sizes on square D in {64, 128, 256}, rectangular
# mappings, and two block sizes of the generic path (48, 8).
BSR_CASES = [(b, d, d) for b in (16, 32, 64) for d in (64, 128, 256)] + [
    (32, 128, 256),
    (64, 256, 128),
    (48, 192, 96),
    (8, 64, 64),
]
DENSITIES = [1 / 16, 1 / 4, 1.0]
ROWS = [1, 37, 130, 1000]  # none a multiple of a row tile but 1
DENSE_CASES = [(d, d) for d in (64, 128, 256)] + [(100, 72), (48, 256)]
if SANITIZE:
    BSR_CASES = [(16, 64, 64), (32, 128, 128), (64, 128, 128), (32, 128, 256), (48, 192, 96)]
    DENSITIES = [1 / 4, 1.0]
    ROWS = [37, 130]
    DENSE_CASES = [(128, 128), (100, 72)]


def _alpha(dtype) -> torch.Tensor:
    return torch.tensor(0.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)


def _rand(gen, *shape, dtype=torch.float64, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _reference(fn, x, matrix, alpha, branch, grad):
    """``y`` and ``(dx, dmatrix, dalpha)`` of ``fn`` in float64 autograd on the CPU."""
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (x, matrix, alpha)]
    y = fn(leaves[0], leaves[1], None if branch is None else branch.cpu().double(), leaves[2])
    return y.detach(), torch.autograd.grad(y, leaves, grad.cpu().double())


def _bsr_problem(b, d_in, d_out, density, n, dtype, seed):
    layout = random_layout(d_out, d_in, b, density, seed=seed).to(DEVICE)
    gen = torch.Generator().manual_seed(seed + 1)
    values = _rand(gen, layout.nnzb, b, b, dtype=dtype, scale=b**-0.5)
    x, branch, grad = _rand(gen, n, d_in, dtype=dtype), _rand(gen, n, d_out, dtype=dtype), _rand(gen, n, d_out, dtype=dtype)
    return layout, values, x, branch, grad


def _check_grads(grads, grads_ref, x, grad, dtype, dalpha_scale, what):
    n = x.shape[0]
    assert_close(grads[0], grads_ref[0], dtype, f"{what} dx")
    assert_close(grads[1], grads_ref[1], dtype, f"{what} dM", scale=max(n, 1) ** 0.5 * 4)
    assert grads[2].shape == () and grads[2].dtype == _alpha(dtype).dtype
    assert_close(grads[2], grads_ref[2], dtype, f"{what} dalpha", scale=max(float(dalpha_scale), 1.0))


@pytest.mark.parametrize("op", ["_cuda_bsr_skip_add", "_cuda_bsr_skip_add_backward", "_cuda_dense_skip_add",
                                "_cuda_dense_skip_add_backward"])
def test_private_ops_have_cuda_kernels(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"entskip::{op}", "CUDA")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BSR_CASES, ids=lambda c: "b{}_{}x{}".format(*c))
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"density{d:g}")
@pytest.mark.parametrize("n", ROWS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("with_branch", [True, False], ids=["branch", "no_branch"])
def test_bsr_matches_reference(poisoned, dtype, case, density, n, with_branch):
    b, d_in, d_out = case
    layout, values, x, branch, grad = _bsr_problem(b, d_in, d_out, density, n, dtype, seed=n + b + d_in)
    branch = branch if with_branch else None
    alpha = _alpha(dtype)
    tensors = layout.tensors()

    y = OPS._cuda_bsr_skip_add(x, values, *tensors, alpha, branch)
    grads = OPS._cuda_bsr_skip_add_backward(grad, x, values, *tensors, alpha, [True, True, True])

    crow, col = layout.crow_indices.cpu(), layout.col_indices.cpu()
    y_ref, grads_ref = _reference(lambda x_, v_, r_, a_: reference.bsr_skip_add(x_, v_, crow, col, r_, a_),
                                  x, values, alpha, branch, grad)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "y")
    dense_abs = layout.to_dense(values.double().abs()).cpu()
    dalpha_scale = (grad.cpu().double().abs() * (x.cpu().double().abs() @ dense_abs.T)).sum()
    _check_grads(grads, grads_ref, x, grad, dtype, dalpha_scale, "bsr")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "{}x{}".format(*c))
@pytest.mark.parametrize("n", ROWS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("with_branch", [True, False], ids=["branch", "no_branch"])
def test_dense_matches_reference(poisoned, dtype, case, n, with_branch):
    d_in, d_out = case
    gen = torch.Generator().manual_seed(n + d_in)
    weight = _rand(gen, d_out, d_in, dtype=dtype, scale=d_in**-0.5)
    x, branch, grad = _rand(gen, n, d_in, dtype=dtype), _rand(gen, n, d_out, dtype=dtype), _rand(gen, n, d_out, dtype=dtype)
    branch = branch if with_branch else None
    alpha = _alpha(dtype)

    y = OPS._cuda_dense_skip_add(x, weight, alpha, branch)
    grads = OPS._cuda_dense_skip_add_backward(grad, x, weight, alpha, [True, True, True])
    y_ref, grads_ref = _reference(reference.skip_add, x, weight, alpha, branch, grad)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    dalpha_scale = (grad.cpu().double().abs() * (x.cpu().double().abs() @ weight.cpu().double().abs().T)).sum()
    _check_grads(grads, grads_ref, x, grad, dtype, dalpha_scale, "dense")


def _mapping(kind, dtype, learnable=True):
    if kind == "sparse":
        layout = random_layout(256, 256, 32, 0.25, seed=3)
        gen = torch.Generator().manual_seed(4)
        blocks = torch.randn(layout.nnzb, 32, 32, generator=gen, dtype=torch.float64) / 32**0.5
        return mappings.BlockSparseMapping(layout, blocks, learnable=learnable).to(DEVICE, dtype)
    return mappings.DenseMapping(mappings.orthogonal(256, seed=5).weight, learnable=learnable).to(DEVICE, dtype)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_api_learnable_alpha(poisoned, kind, dtype):
    """``entskip.skip_add`` under ``use_backend("cuda")``: (batch, tokens, D) activations, a
    learnable mapping and alpha, every gradient (dbranch too) against the reference."""
    mapping = _mapping(kind, dtype)
    gen = torch.Generator().manual_seed(6)
    x = _rand(gen, 3, 43, 256, dtype=dtype).requires_grad_(True)
    branch = _rand(gen, 3, 43, 256, dtype=dtype).requires_grad_(True)
    alpha = torch.tensor(0.7, device=DEVICE, requires_grad=True)
    grad = _rand(gen, 3, 43, 256, dtype=dtype)
    with entskip.use_backend("cuda"):
        y = entskip.skip_add(x, mapping, branch, alpha)
    stored = mapping.blocks if kind == "sparse" else mapping.weight
    grads = torch.autograd.grad(y, (x, stored, alpha, branch), grad)

    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (x, stored, alpha, branch)]
    if kind == "sparse":
        layout = mapping.layout.to("cpu")
        y_ref = reference.bsr_skip_add(leaves[0], leaves[1], layout.crow_indices, layout.col_indices, leaves[3], leaves[2])
    else:
        y_ref = reference.skip_add(leaves[0], leaves[1], leaves[3], leaves[2])
    grads_ref = torch.autograd.grad(y_ref, leaves, grad.cpu().double())
    assert_close(y, y_ref, dtype, "y")
    assert_close(grads[0], grads_ref[0], dtype, "dx")
    assert_close(grads[1], grads_ref[1], dtype, "dM", scale=129**0.5 * 4)
    matrix_abs = mapping.matrix().detach().cpu().double().abs()
    dalpha_scale = (grad.cpu().double().abs() * (x.detach().cpu().double().abs() @ matrix_abs.T)).sum()
    assert_close(grads[2], grads_ref[2], dtype, "dalpha", scale=max(float(dalpha_scale), 1.0))
    assert torch.equal(grads[3], grad)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_public_api_backward_of_a_sum(kind):
    """``y.sum().backward()`` hands the op an expanded (stride-0) gradient."""
    mapping = _mapping(kind, torch.float32)
    gen = torch.Generator().manual_seed(21)
    x = _rand(gen, 37, 256, dtype=torch.float32).requires_grad_(True)
    alpha = torch.tensor(0.7, device=DEVICE, requires_grad=True)
    with entskip.use_backend("cuda"):
        entskip.skip_add(x, mapping, None, alpha).sum().backward()
    matrix = mapping.matrix().detach()
    assert_close(x.grad, (0.7 * matrix.sum(0)).expand(37, 256).cpu().double(), torch.float32, "dx")
    assert_close(alpha.grad, (x.detach() @ matrix.T).sum().cpu().double(), torch.float32, "dalpha",
                 scale=float((x.detach().abs() @ matrix.abs().T).sum()))


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_opcheck(kind):
    mapping = _mapping(kind, torch.float32)
    gen = torch.Generator().manual_seed(7)
    x, branch = _rand(gen, 64, 256, dtype=torch.float32), _rand(gen, 64, 256, dtype=torch.float32)
    alpha = torch.tensor(0.7, device=DEVICE)
    with entskip.use_backend("cuda"):
        if kind == "sparse":
            args = (x.requires_grad_(), mapping.blocks.detach().requires_grad_(), *mapping.layout.tensors(), alpha, branch)
            torch.library.opcheck(OPS.bsr_skip_add.default, args)
        else:
            torch.library.opcheck(OPS.dense_skip_add.default, (x.requires_grad_(), mapping.weight.detach().requires_grad_(), alpha, branch))


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_compile_fullgraph(kind):
    mapping = _mapping(kind, torch.bfloat16, learnable=False)
    gen = torch.Generator().manual_seed(8)
    x, branch = _rand(gen, 300, 256, dtype=torch.bfloat16), _rand(gen, 300, 256, dtype=torch.bfloat16)
    alpha = torch.tensor(0.8, device=DEVICE, requires_grad=True)
    with entskip.use_backend("cuda"):
        eager = entskip.skip_add(x, mapping, branch, alpha)
        compiled = torch.compile(lambda a, r: entskip.skip_add(a, mapping, r, alpha), fullgraph=True)(x, branch)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_cuda_graph_capture(kind):
    """Forward and backward ops captured in a CUDA graph (nothing synchronises) and replayed on new data."""
    mapping = _mapping(kind, torch.bfloat16, learnable=False)
    gen = torch.Generator().manual_seed(9)
    x, branch, grad = (_rand(gen, 300, 256, dtype=torch.bfloat16) for _ in range(3))
    alpha = torch.tensor(0.8, device=DEVICE)
    static_x, static_grad = torch.zeros_like(x), torch.zeros_like(grad)
    stored = mapping.blocks if kind == "sparse" else mapping.weight
    args = mapping.layout.tensors() if kind == "sparse" else ()
    name = "bsr_skip_add" if kind == "sparse" else "dense_skip_add"

    def run():
        fwd, bwd = getattr(OPS, name), getattr(OPS, name + "_backward")
        y = fwd(static_x, stored, *args, alpha, branch)
        return y, bwd(static_grad, static_x, stored, *args, alpha, [True, True, True])

    with entskip.use_backend("cuda"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # warm-up: layout validated, cuBLASLt algorithm chosen
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        static_x.copy_(x)
        static_grad.copy_(grad)
        graph.replay()
        expected = run()
    torch.testing.assert_close(out[0], expected[0], rtol=0, atol=0)
    for got, want in zip(out[1], expected[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_backward_is_deterministic(kind, dtype):
    """Split-N partials and fixed-order reductions: two runs are bit-identical."""
    mapping = _mapping(kind, dtype, learnable=False)
    gen = torch.Generator().manual_seed(10)
    x, grad = _rand(gen, 5000, 256, dtype=dtype), _rand(gen, 5000, 256, dtype=dtype)
    alpha = torch.tensor(0.7, device=DEVICE)
    if kind == "sparse":
        def run():
            return OPS._cuda_bsr_skip_add_backward(grad, x, mapping.blocks, *mapping.layout.tensors(), alpha,
                                                   [True, True, True])
    else:
        def run():
            return OPS._cuda_dense_skip_add_backward(grad, x, mapping.weight, alpha, [True, True, True])
    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True)], ids=str)
def test_backward_output_mask(mask):
    layout, values, x, _, grad = _bsr_problem(32, 128, 128, 0.5, 9, torch.float32, seed=11)
    alpha = _alpha(torch.float32)
    for got in (
        OPS._cuda_bsr_skip_add_backward(grad, x, values, *layout.tensors(), alpha, list(mask)),
        OPS._cuda_dense_skip_add_backward(grad, x, layout.to_dense(values), alpha, list(mask)),
    ):
        assert [t is not None for t in got] == list(mask)


@pytest.mark.parametrize("alpha_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_alpha_dtypes(poisoned, alpha_dtype):
    """alpha is read in its own dtype on the device; dalpha comes back in alpha's dtype."""
    layout, values, x, branch, grad = _bsr_problem(32, 128, 128, 0.5, 37, torch.bfloat16, seed=12)
    alpha = torch.tensor(0.7, dtype=alpha_dtype, device=DEVICE)
    y = OPS._cuda_bsr_skip_add(x, values, *layout.tensors(), alpha, branch)
    dalpha = OPS._cuda_bsr_skip_add_backward(grad, x, values, *layout.tensors(), alpha, [False, False, True])[2]
    crow, col = layout.crow_indices.cpu(), layout.col_indices.cpu()
    y_ref = reference.bsr_skip_add(x.cpu().double(), values.cpu().double(), crow, col, branch.cpu().double(),
                                   alpha.cpu().double())
    assert_close(y, y_ref, torch.bfloat16, "y")
    assert dalpha.dtype == alpha_dtype and dalpha.shape == ()
    y = OPS._cuda_dense_skip_add(x, layout.to_dense(values), alpha, branch)
    assert_close(y, y_ref, torch.bfloat16, "dense y")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unaligned_inputs_take_the_generic_path(poisoned, dtype):
    """Contiguous tensors whose data does not start on 16 bytes (a storage offset) are correct."""
    layout, values, x, branch, grad = _bsr_problem(32, 128, 128, 0.5, 37, dtype, seed=13)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEVICE)
        out = buf[1:].view(t.shape)
        out.copy_(t)
        assert out.is_contiguous() and out.data_ptr() % 16 != 0
        return out

    alpha = _alpha(dtype)
    y = OPS._cuda_bsr_skip_add(shifted(x), shifted(values), *layout.tensors(), alpha, shifted(branch))
    grads = OPS._cuda_bsr_skip_add_backward(shifted(grad), shifted(x), shifted(values), *layout.tensors(), alpha,
                                            [True, True, True])
    aligned = OPS._cuda_bsr_skip_add(x, values, *layout.tensors(), alpha, branch)
    aligned_grads = OPS._cuda_bsr_skip_add_backward(grad, x, values, *layout.tensors(), alpha, [True, True, True])
    assert_close(y, aligned.double(), dtype, "y")
    for got, want, what in zip(grads, aligned_grads, ("dx", "dvalues", "dalpha")):
        assert_close(got, want.double(), dtype, what, scale=max(float(want.double().abs().max()), 1.0) * 4)


def test_empty_inputs(poisoned):
    layout, values, x, branch, grad = _bsr_problem(16, 64, 64, 0.5, 0, torch.float32, seed=14)
    alpha = _alpha(torch.float32)
    assert OPS._cuda_bsr_skip_add(x, values, *layout.tensors(), alpha, branch).shape == (0, 64)
    dx, dv, da = OPS._cuda_bsr_skip_add_backward(grad, x, values, *layout.tensors(), alpha, [True, True, True])
    assert dx.shape == (0, 64) and torch.equal(dv, torch.zeros_like(dv)) and float(da) == 0.0
    dx, dw, da = OPS._cuda_dense_skip_add_backward(grad, x, layout.to_dense(values), alpha, [True, True, True])
    assert dx.shape == (0, 64) and torch.equal(dw, torch.zeros_like(dw)) and float(da) == 0.0
    empty = random_layout(64, 64, 16, 0.0, seed=0).to(DEVICE)
    _, _, x, branch, grad = _bsr_problem(16, 64, 64, 0.5, 9, torch.float32, seed=15)
    y = OPS._cuda_bsr_skip_add(x, values[:0], *empty.tensors(), alpha, branch)
    assert torch.equal(y, branch)  # no stored block: only the residual
    dx, dv, da = OPS._cuda_bsr_skip_add_backward(grad, x, values[:0], *empty.tensors(), alpha, [True, True, True])
    assert torch.equal(dx, torch.zeros_like(dx)) and dv.shape == (0, 16, 16) and float(da) == 0.0


def test_float32_is_exact_unless_tf32_is_allowed():
    """float32 BSR runs SIMT FMA; dense float32 uses TF32 only where torch allows it for cuBLAS."""
    assert not torch.backends.cuda.matmul.allow_tf32
    gen = torch.Generator().manual_seed(16)
    x, weight = _rand(gen, 512, 1024, dtype=torch.float32), _rand(gen, 1024, 1024, dtype=torch.float32, scale=1 / 32)
    alpha = _alpha(torch.float32)
    y = OPS._cuda_dense_skip_add(x, weight, alpha, None)
    expected = reference.skip_add(x.cpu().double(), weight.cpu().double(), None, alpha.cpu().double())
    assert_close(y, expected, torch.float32, "y")


def test_bad_inputs_raise():
    layout, values, x, branch, grad = _bsr_problem(16, 64, 64, 0.5, 4, torch.float32, seed=17)
    t = layout.tensors()
    alpha = _alpha(torch.float32)
    bad = [
        (lambda: OPS._cuda_bsr_skip_add(x.t().contiguous().t(), values, *t, alpha, branch), "x must be contiguous"),
        (lambda: OPS._cuda_bsr_skip_add(x, values.double(), *t, alpha, branch), "values has dtype"),
        (lambda: OPS._cuda_bsr_skip_add(x, values, *t, alpha.reshape(1), branch), "alpha must be a 0-d tensor"),
        (lambda: OPS._cuda_bsr_skip_add(x, values, t[0], t[1].int(), *t[2:], alpha, branch), "col_indices must be a 1-D int64"),
        (lambda: OPS._cuda_bsr_skip_add(x, values, *t, alpha, branch[:, :32].contiguous()), "branch must have shape"),
        (lambda: OPS._cuda_bsr_skip_add(x[:, :40].contiguous(), values, *t, alpha, branch), "not divisible by the block size"),
        (lambda: OPS._cuda_bsr_skip_add(x, values, *t, alpha.cpu(), branch), "alpha is on cpu"),
        (lambda: OPS._cuda_bsr_skip_add_backward(grad[:, :32].contiguous(), x, values, *t, alpha, [True] * 3), "grad must have shape"),
        (lambda: OPS._cuda_dense_skip_add(x, torch.randn(64, 32, device=DEVICE), alpha, branch), "weight must have shape"),
        (lambda: OPS._cuda_dense_skip_add(x.int(), torch.randn(64, 64, device=DEVICE), alpha, branch), "x must be float32"),
    ]
    for call, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call()


def test_invalid_layout_never_reaches_a_kernel():
    """The public op validates the layout (once per layout) before the CUDA kernels run."""
    layout, values, x, branch, _ = _bsr_problem(16, 64, 64, 0.5, 4, torch.float32, seed=18)
    crow, col, ccol, row, perm = (t.clone() for t in layout.tensors())
    col[0] = 4  # out of range: 4 block columns
    with entskip.use_backend("cuda"), pytest.raises(ValueError, match="col_indices"):
        OPS.bsr_skip_add(x, values, crow, col, ccol, row, perm, _alpha(torch.float32), branch)


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


@pytest.mark.skipif(_free_bytes() < 24 << 30, reason="slow: needs about 24 GiB of free GPU memory")
def test_64bit_indexing_2_31():
    """N * D > 2**31 (slow, big memory): forward, dx and the sampled gradient index in int64."""
    n, d = (1 << 31) // 1024 + 64, 1024
    layout = random_layout(d, d, 32, 1 / 16, seed=19).to(DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(20)
    x = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    values = torch.randn(layout.nnzb, 32, 32, device=DEVICE, dtype=torch.bfloat16, generator=gen) / 32**0.5
    alpha = torch.tensor(0.7, device=DEVICE)
    tail = slice(n - 100, n)
    crow, col = layout.crow_indices.cpu(), layout.col_indices.cpu()
    y = OPS._cuda_bsr_skip_add(x, values, *layout.tensors(), alpha, None)
    expected = reference.bsr_skip_add(x[tail].cpu().double(), values.cpu().double(), crow, col, None, alpha.cpu().double())
    assert_close(y[tail], expected, torch.bfloat16, "last rows of y")
    del y
    grad = torch.zeros_like(x)
    grad[tail] = torch.randn(100, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    dx, dvalues, _ = OPS._cuda_bsr_skip_add_backward(grad, x, values, *layout.tensors(), alpha, [True, True, False])
    _, (dx_ref, dv_ref, _) = _reference(lambda x_, v_, r_, a_: reference.bsr_skip_add(x_, v_, crow, col, r_, a_),
                                        x[tail], values, alpha, None, grad[tail])
    assert_close(dx[tail], dx_ref, torch.bfloat16, "last rows of dx")
    assert_close(dvalues, dv_ref, torch.bfloat16, "dvalues (only the last rows have a gradient)", scale=100**0.5 * 4)

