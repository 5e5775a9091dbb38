"""The fused identity and permutation skip-adds (``identity_skip.py``, ``permutation_skip.py``):
the mappings and ``skip_add(x, None)`` run them, and every backend matches the float64
reference forward and in every gradient, on any leading shape, dtype, stride and size.

The Triton kernels run in the interpreter here (``TRITON_INTERPRET=1``, set by conftest)
on CPU tensors through ``gpu_forward``/``gpu_backward``; the CUDA C++ kernels are
compile-checked by ``.ci/nvcc_check.sh``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import entskip
from entskip import gpu_dispatch, identity_skip, mappings, permutation_skip, reference

from conftest import OpLog, assert_close

OPS = torch.ops.entskip
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LEADS = [(1,), (7,), (3, 100), (2, 3, 5), (0,), (2, 0, 3)]
KINDS = ["identity", "permutation"]


def _mapping(kind: str, d: int) -> mappings.Mapping:
    return mappings.identity(d) if kind == "identity" else mappings.permutation(d, seed=d)


def _reference(kind, mapping, x, branch, alpha):
    if kind == "identity":
        return reference.identity_skip_add(x, branch, alpha)
    return reference.permutation_skip_add(x, mapping.index, branch, alpha)


def _inputs(shape, dtype, seed=0, alpha=0.7):
    gen = torch.Generator().manual_seed(seed)
    x, branch, grad = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    a = torch.tensor(alpha, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return x, branch, grad, a


# ----------------------------------------------------------------------------------------
# Fusion: the mappings and skip_add(x, None) go through the fused ops.

@pytest.mark.parametrize("call", ["identity_mapping", "skip_add_none", "entangled_skip", "permutation_mapping"])
def test_skips_run_the_fused_op(call, cpu_backend):
    x, branch, _, alpha = _inputs((4, 32), torch.float32)
    fused = "entskip.permutation_skip_add.default" if call == "permutation_mapping" else "entskip.identity_skip_add.default"
    identity, perm, module = mappings.identity(32), mappings.permutation(32, seed=1), entskip.EntangledSkip(32, alpha=0.9)
    with OpLog() as log:
        if call == "identity_mapping":
            identity.skip_add_2d(x, branch, alpha)
        elif call == "skip_add_none":
            entskip.skip_add(x, None, branch, alpha)
        elif call == "entangled_skip":
            module(x, branch)
        else:
            perm.skip_add_2d(x, branch, alpha)
    computing = [op for op in log.big if not op.startswith(("aten.reshape", "aten.view", "aten._unsafe_view"))]
    assert computing == [fused], log.ops


@pytest.mark.parametrize("kind", KINDS)
def test_fused_backward_is_one_op(kind, cpu_backend):
    """dx and dalpha come from one backward op; dbranch is the incoming gradient itself."""
    x, branch, grad, alpha = _inputs((6, 48), torch.float32)
    mapping = _mapping(kind, 48)
    x, branch, alpha = (t.requires_grad_() for t in (x, branch, alpha))
    y = entskip.skip_add(x, mapping, branch, alpha)
    with OpLog() as log:
        dx, dbranch, dalpha = torch.autograd.grad(y, (x, branch, alpha), grad)
    assert log.ops.count(f"entskip.{kind}_skip_add_backward.default") == 1
    assert [op for op in log.big if not op.startswith(("aten.view", "aten._unsafe_view", "aten.reshape"))] == [
        f"entskip.{kind}_skip_add_backward.default"], log.ops
    assert dbranch is grad or dbranch.data_ptr() == grad.data_ptr()  # handed on, not copied


@pytest.mark.parametrize("kind", KINDS)
def test_reference_backend_keeps_plain_torch_ops(kind):
    x, branch, _, alpha = _inputs((4, 16), torch.float32)
    with entskip.use_backend("reference"), OpLog() as log:
        entskip.skip_add(x, _mapping(kind, 16), branch, alpha)
    assert not [op for op in log.ops if op.startswith("entskip.")]
    assert "aten.mul.Tensor" in log.ops


@pytest.mark.parametrize("kind", KINDS)
def test_x_is_saved_only_for_dalpha(kind, cpu_backend):
    x, branch, _, alpha = _inputs((4, 16), torch.float32)
    mapping = _mapping(kind, 16)
    for learnable, expected in ((False, False), (True, True)):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        xg = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            entskip.skip_add(xg, mapping, branch, alpha.clone().requires_grad_(learnable))
        assert any(t is xg or (t.shape == xg.shape and t.data_ptr() == xg.data_ptr()) for t in saved) == expected


@pytest.mark.parametrize("kind", KINDS)
def test_autograd_is_a_cpp_node(kind, cpu_backend):
    """The elementwise ops' autograd is the C++ one of csrc/elementwise_autograd.cpp: no Python
    runs between the call and the kernel (a register_autograd layer would show as a Python node)."""
    x, branch, _, alpha = _inputs((4, 16), torch.float32)
    y = entskip.skip_add(x.requires_grad_(), _mapping(kind, 16), branch, alpha)
    expected = "IdentitySkipAdd" if kind == "identity" else "PermutationSkipAdd"
    assert expected in y.grad_fn.name() and "CppNode" in y.grad_fn.name(), y.grad_fn.name()


@pytest.mark.parametrize("with_branch", [True, False], ids=["branch", "nobranch"])
@pytest.mark.parametrize("kind", KINDS)
def test_second_derivative_raises(kind, with_branch, cpu_backend):
    """dx and dalpha are differentiable once: a second backward through them raises, while the
    first derivatives taken with create_graph=True are the ordinary ones and dbranch (the
    incoming gradient) stays differentiable."""
    x, branch, grad, alpha = _inputs((3, 8), torch.float64)
    mapping = _mapping(kind, 8)
    x, alpha = x.requires_grad_(), alpha.requires_grad_()
    b = branch.requires_grad_() if with_branch else None
    grad = grad.requires_grad_()
    y = entskip.skip_add(x, mapping, b, alpha)
    firsts = torch.autograd.grad(y, (x, alpha, b) if with_branch else (x, alpha), grad, create_graph=True)
    y_ref = _reference(kind, mapping, x, b, alpha)
    for got, want in zip(firsts, torch.autograd.grad(y_ref, (x, alpha, b) if with_branch else (x, alpha), grad)):
        torch.testing.assert_close(got.detach(), want)
    for first in firsts[:2]:
        with pytest.raises(RuntimeError, match="differentiable once"):
            first.sum().backward(retain_graph=True)
    if with_branch:  # dbranch = grad: d(sum dbranch)/dgrad = 1
        torch.testing.assert_close(torch.autograd.grad(firsts[2].sum(), grad)[0], torch.ones_like(grad))


# ----------------------------------------------------------------------------------------
# Against the float64 reference: every backend, dtype, leading shape, branch or not.

def _check(kind, dtype, lead, with_branch, run_forward, run_backward, d=40, seed=0):
    mapping = _mapping(kind, d)
    x, branch, grad, alpha = _inputs((*lead, d), dtype, seed)
    branch = branch if with_branch else None
    y = run_forward(mapping, x, branch, alpha)
    dx, dalpha = run_backward(mapping, grad, x, alpha, [True, True])
    xr, ar = x.double().requires_grad_(), alpha.double().requires_grad_()
    y_ref = _reference(kind, mapping, xr, None if branch is None else branch.double(), ar)
    dx_ref, dalpha_ref = torch.autograd.grad(y_ref, (xr, ar), grad.double())
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    assert dalpha.dtype == alpha.dtype and dalpha.shape == ()
    # dalpha sums N * D products that cancel: its scale is the sum of their magnitudes
    assert_close(dalpha, dalpha_ref, dtype, "dalpha", scale=max((grad.double() * x.double()).abs().sum().item(), 1.0))
    for mask in ([True, False], [False, True]):
        got = run_backward(mapping, grad, x, alpha, mask)
        assert [t is not None for t in got] == mask
        if mask[0]:
            assert torch.equal(got[0], dx)
        else:  # the compiler may contract the products into FMAs differently without dx
            assert_close(got[1], dalpha, dtype, "dalpha alone", scale=max((grad.double() * x.double()).abs().sum().item(), 1.0))


# The CPU permutation kernel works on tiles of 16 rows (8 for float64) transposed in 16 x 16
# (8 x 8) blocks, 16-bit tiles two blocks at a time with AVX-512 (544, 560 and 575 features:
# pairs of blocks only, then one block, then a scalar tail): row counts and feature counts
# on either side of those sizes, row counts spanning several work chunks (about 16384
# elements each) with a partial last tile, and rows wider than 16384 features (permuted by
# a copy instead of tiles). With AVX-512 the rows of up to 50 features here are permuted in
# registers instead (next test); the wider ones keep the tiles' partial tiles and tails.
@pytest.mark.parametrize("rows,d", [(r, d) for r in (1, 7, 8, 9, 15, 16, 17, 40) for d in (1, 7, 8, 15, 16, 17, 50)]
                         + [(1030, 16), (100, 200), (33, 1000), (19, 544), (19, 560), (5, 575), (3, 16385), (17, 16400)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_permutation_tile_edges(dtype, rows, d, poisoned, cpu_backend):
    _check("permutation", dtype, (rows,), True, _cpu_forward, _cpu_backward, d=d, seed=rows * 1000 + d)


# With AVX-512, rows of up to 128 float64, 256 float32 or 512 16-bit elements are permuted
# in registers, from pairs of 64-byte vectors: feature counts around one vector, one pair
# and those limits (on either side of which the tiles take over); rows go two at a time, and
# 19 rows leave a last one alone.
@pytest.mark.parametrize("d", [31, 32, 33, 63, 64, 65, 127, 128, 129, 192, 255, 256, 257, 511, 512, 513])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_permutation_register_edges(dtype, d, poisoned, cpu_backend):
    _check("permutation", dtype, (19,), True, _cpu_forward, _cpu_backward, d=d, seed=d)


def _cpu_forward(mapping, x, branch, alpha):
    return entskip.skip_add(x, mapping, branch, alpha)


def _cpu_backward(mapping, grad, x, alpha, mask):
    if isinstance(mapping, mappings.IdentityMapping):
        return OPS.identity_skip_add_backward(grad, x, alpha, mask)
    return OPS.permutation_skip_add_backward(grad, x, mapping.index, mapping.inverse, alpha, mask)


@pytest.mark.parametrize("with_branch", [True, False], ids=["branch", "nobranch"])
@pytest.mark.parametrize("lead", LEADS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_matches_reference(kind, dtype, lead, with_branch, poisoned, cpu_backend):
    _check(kind, dtype, lead, with_branch, _cpu_forward, _cpu_backward)


@pytest.mark.parametrize("d", [1, 15, 16, 33, 1000])
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_feature_counts_off_the_vector_width(kind, d, poisoned, cpu_backend):
    _check(kind, torch.float32, (3, 7), True, _cpu_forward, _cpu_backward, d=d)


@pytest.mark.parametrize("kind", KINDS)
def test_cpu_public_autograd_matches_reference(kind, poisoned, cpu_backend):
    """entskip.skip_add's own autograd (x, branch and a learnable alpha) against the reference's."""
    mapping = _mapping(kind, 64)
    x, branch, grad, alpha = _inputs((5, 9, 64), torch.float32, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, branch, alpha)]
    y = entskip.skip_add(leaves[0], mapping, leaves[1], leaves[2])
    grads = torch.autograd.grad(y, leaves, grad)
    ref = [t.double().requires_grad_() for t in (x, branch, alpha)]
    y_ref = _reference(kind, mapping, *ref)
    grads_ref = torch.autograd.grad(y_ref, ref, grad.double())
    assert_close(y, y_ref, torch.float32, "y")
    scale = (grad.double() * x.double()).abs().sum().item()
    for name, g, g_ref in zip(("dx", "dbranch", "dalpha"), grads, grads_ref):
        assert_close(g, g_ref, torch.float32, name, scale=scale if name == "dalpha" else None)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind, cpu_backend):
    mapping = _mapping(kind, 24)
    x, branch, _, alpha = _inputs((3, 5, 24), torch.float64)
    leaves = [t.requires_grad_() for t in (x, branch, alpha)]

    def f(x_, b_, a_):
        return entskip.skip_add(x_, mapping, b_, a_)

    assert torch.autograd.gradcheck(f, leaves)
    # non-contiguous inputs: transposed leading dims (read in place), strided features (copied)
    assert torch.autograd.gradcheck(lambda x_, b_, a_: f(x_.transpose(0, 1), b_.transpose(0, 1), a_), leaves)
    xs = torch.randn(3, 48, dtype=torch.float64)[:, ::2].requires_grad_()
    assert torch.autograd.gradcheck(lambda x_, a_: f(x_, None, a_), (xs, leaves[2]))


@pytest.mark.parametrize("with_branch", [True, False], ids=["branch", "nobranch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype, with_branch, cpu_backend):
    p = mappings.permutation(32, seed=3)
    x, branch, grad, alpha = _inputs((5, 32), dtype)
    x.requires_grad_()
    alpha.requires_grad_()
    b = branch.requires_grad_() if with_branch else None
    torch.library.opcheck(OPS.identity_skip_add.default, (x, alpha, b))
    torch.library.opcheck(OPS.permutation_skip_add.default, (x, p.index, p.inverse, alpha, b))
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(OPS.identity_skip_add_backward.default, (grad, x.detach(), alpha.detach(), mask))
        torch.library.opcheck(OPS.permutation_skip_add_backward.default,
                              (grad, x.detach(), p.index, p.inverse, alpha.detach(), mask))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph(kind, backend, cpu_backend):
    if backend == "inductor" and kind == "permutation":
        pytest.skip("one inductor compile is enough (slow on two cores); aot_eager covers the permutation")
    skip = entskip.EntangledSkip(32, kind, alpha=0.8, learnable_alpha=True)
    x, branch, grad, _ = _inputs((4, 6, 32), torch.float32)
    compiled = torch.compile(skip, fullgraph=True, backend=backend)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y_eager = skip(xs[0], branch)
    y = compiled(xs[1], branch)
    assert_close(y, y_eager, torch.float32, "y")
    y_eager.backward(grad)
    ga = skip.alpha.grad.clone()
    skip.alpha.grad = None
    y.backward(grad)
    assert_close(xs[1].grad, xs[0].grad, torch.float32, "dx")
    assert_close(skip.alpha.grad, ga, torch.float32, "dalpha", scale=(grad * x).abs().sum().item())


# ----------------------------------------------------------------------------------------
# Edge cases.

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(kind, dtype, poisoned, cpu_backend):
    mapping = _mapping(kind, 40)
    base, bbase, grad, alpha = _inputs((6, 5, 80), dtype)
    cases = {
        "rows strided (slice of features)": (base[..., :40], bbase[..., 40:]),
        "leading dims transposed": (base[..., :40].transpose(0, 1), bbase[..., :40].transpose(0, 1)),
        "features strided": (base[..., ::2], bbase[..., 1::2]),
        "branch expanded": (base[..., :40], bbase[0, 0, :40].expand(6, 5, 40)),
    }
    for name, (x, branch) in cases.items():
        y = entskip.skip_add(x, mapping, branch, alpha)
        assert_close(y, _reference(kind, mapping, x.double(), branch.double(), alpha.double()), dtype, name)
        g = grad[..., :40].transpose(0, 1) if x.dim() == 3 and x.shape[0] == 5 else grad[..., :40]
        dx, dalpha = _cpu_backward(mapping, g, x, alpha, [True, True])
        xr, ar = x.double().requires_grad_(), alpha.double().requires_grad_()
        dx_ref, da_ref = torch.autograd.grad(_reference(kind, mapping, xr, None, ar), (xr, ar), g.double())
        assert_close(dx, dx_ref, dtype, f"{name}: dx")
        assert_close(dalpha, da_ref, dtype, f"{name}: dalpha", scale=(g.double() * xr).abs().sum().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_nan_and_inf_propagate_as_in_the_reference(kind, dtype, cpu_backend):
    mapping = _mapping(kind, 40)
    x, branch, grad, alpha = _inputs((3, 40), dtype)
    x[0, 3], x[1, 5], x[2, 7] = float("nan"), float("inf"), float("-inf")
    branch[1, 9], branch[2, 11] = float("inf"), float("nan")
    grad[0, 1] = float("inf")
    y = entskip.skip_add(x, mapping, branch, alpha)
    y_ref = _reference(kind, mapping, x.double(), branch.double(), alpha.double())
    for special in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(special(y), special(y_ref)), special.__name__
    assert torch.equal(y.isfinite(), y_ref.isfinite())
    dx, dalpha = _cpu_backward(mapping, grad, x, alpha, [True, True])
    xr, ar = x.double().requires_grad_(), alpha.double().requires_grad_()
    dx_ref, da_ref = torch.autograd.grad(_reference(kind, mapping, xr, None, ar), (xr, ar), grad.double())
    for special in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(special(dx), special(dx_ref)), special.__name__
    assert torch.isnan(dalpha) and torch.isnan(da_ref)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_inputs(kind, cpu_backend):
    for shape in ((0, 16), (3, 0), (2, 0, 5)):
        d = shape[-1]
        x, branch, grad, alpha = _inputs(shape, torch.float32)
        if kind == "permutation":
            index = torch.arange(d)
            y = OPS.permutation_skip_add(x, index, index, alpha, branch)
            dx, da = OPS.permutation_skip_add_backward(grad, x, index, index, alpha, [True, True])
        else:
            y = OPS.identity_skip_add(x, alpha, branch)
            dx, da = OPS.identity_skip_add_backward(grad, x, alpha, [True, True])
        assert y.shape == shape and dx.shape == shape and float(da) == 0.0


# Outputs (y, dx) of 4 MiB or more in rows of at least 512 bytes are written by
# non-temporal stores in whole 64-byte lines, element by element up to the first aligned
# one: sizes just over the threshold for each dtype, with odd row widths that leave rows
# unaligned, rows read with a stride (the identity's segments then start anywhere) and
# features-first maps (N, D, S) of odd S.
def _streamed_shape(dtype, layout):
    elements = (4 << 20) // dtype.itemsize + 4099
    if layout == "features first":
        return (1, 13, elements // 13 | 1)
    d = {8: 1007, 4: 1021, 2: 1023}[dtype.itemsize]
    return (elements // d + 1, d)


@pytest.mark.parametrize("kind,layout", [("identity", "contiguous"), ("identity", "strided rows"),
                                         ("permutation", "contiguous"), ("permutation", "strided rows"),
                                         ("permutation", "features first")])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_streamed_outputs_match_reference(kind, layout, dtype, poisoned, cpu_backend):
    shape = _streamed_shape(dtype, layout)
    x, branch, grad, alpha = _inputs((*shape[:-1], shape[-1] + 3), dtype, seed=shape[-1])
    if layout == "strided rows":
        x, branch, grad = x[..., 3:], branch[..., :-3], grad[..., 1:-2]
    else:
        x, branch, grad = (t[..., :-3].contiguous() for t in (x, branch, grad))
    assert x.numel() * dtype.itemsize >= 4 << 20
    ff = layout == "features first"
    mapping = _mapping(kind, x.shape[1] if ff else x.shape[-1])
    if kind == "identity":
        y = OPS.identity_skip_add(x, alpha, branch)
        dx, dalpha = OPS.identity_skip_add_backward(grad, x, alpha, [True, True])
    else:
        y = OPS.permutation_skip_add(x, mapping.index, mapping.inverse, alpha, branch, ff)
        dx, dalpha = OPS.permutation_skip_add_backward(grad, x, mapping.index, mapping.inverse, alpha, [True, True], ff)
    xr, ar = x.double().requires_grad_(), alpha.double().requires_grad_()
    y_ref = ar * xr[:, mapping.index] + branch.double() if ff else _reference(kind, mapping, xr, branch.double(), ar)
    dx_ref, dalpha_ref = torch.autograd.grad(y_ref, (xr, ar), grad.double())
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dalpha, dalpha_ref, dtype, "dalpha", scale=(grad.double() * x.double()).abs().sum().item())


@pytest.mark.parametrize("shape", [(15, 197, 200), (9, 16400), (1030, 1021)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_deterministic_across_thread_counts(kind, dtype, shape, cpu_backend):
    """dalpha is summed over fixed chunks in a fixed order: bitwise equal for 1, 2 and 3
    threads and over repeated calls, whichever thread claims which chunk (shapes with
    partial tiles and feature tails; rows wider than the tiles; a dx written by
    non-temporal stores from unaligned rows)."""
    mapping = _mapping(kind, shape[-1])
    x, _, grad, alpha = _inputs(shape, dtype, seed=4)
    previous = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for call in range(1 if threads == 1 else 3):
                results[threads, call] = _cpu_backward(mapping, grad, x, alpha, [True, True])
    finally:
        torch.set_num_threads(previous)
    for (threads, call), result in results.items():
        for name, u, v in zip(("dx", "dalpha"), results[1, 0], result):
            assert torch.equal(u, v), f"{name} with {threads} threads (call {call}) differs from 1 thread"


def test_permutation_op_rejects_a_broken_index(cpu_backend):
    p = mappings.permutation(16, seed=5)
    x, branch, grad, alpha = _inputs((2, 16), torch.float32)
    bad = p.index.clone()
    bad[0] = 16
    with pytest.raises(RuntimeError, match=r"index\[0\] = 16 is out of range"):
        OPS.permutation_skip_add(x, bad, p.inverse, alpha, branch)
    with pytest.raises(RuntimeError, match="inverse is not the inverse permutation"):
        OPS.permutation_skip_add_backward(grad, x, p.index, p.index.flip(0), alpha, [True, True])
    with pytest.raises(RuntimeError, match="index must have 16 entries"):
        OPS.permutation_skip_add(x, p.index[:8], p.inverse, alpha, branch)
    with pytest.raises(RuntimeError, match="branch must have x's shape"):
        OPS.identity_skip_add(x, alpha, branch[:, :8])


def test_permutation_inverse_follows_a_loaded_index():
    a, b = mappings.permutation(32, seed=1), mappings.permutation(32, seed=2)
    assert "inverse" not in a.state_dict()
    a.load_state_dict(b.state_dict())
    assert torch.equal(a.inverse, b.inverse) and torch.equal(a.index[a.inverse], torch.arange(32))
    x = torch.randn(3, 32)
    assert torch.equal(a.skip_add_2d(x, None, torch.tensor(0.5)), b.skip_add_2d(x, None, torch.tensor(0.5)))


def test_permutation_inverse_moves_with_the_mapping():
    m = copy.deepcopy(mappings.permutation(8, seed=3)).to(torch.bfloat16)
    assert m.inverse.dtype == torch.int64 and torch.equal(m.index[m.inverse], torch.arange(8))


# ----------------------------------------------------------------------------------------
# Triton kernels (interpreter on the CPU, small shapes).

triton_only = pytest.mark.skipif(
    not gpu_dispatch.triton_available() or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton and a GPU or TRITON_INTERPRET=1",
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_forward(mapping, x, branch, alpha):
    x, alpha = x.to(DEVICE), alpha.to(DEVICE)
    branch = None if branch is None else branch.to(DEVICE)
    if isinstance(mapping, mappings.IdentityMapping):
        return identity_skip.gpu_forward(x, alpha, branch, backend="triton").cpu()
    m = mapping.to(DEVICE)
    return permutation_skip.gpu_forward(x, m.index, m.inverse, alpha, branch, backend="triton").cpu()


def _triton_backward(mapping, grad, x, alpha, mask):
    grad, x, alpha = grad.to(DEVICE), x.to(DEVICE), alpha.to(DEVICE)
    if isinstance(mapping, mappings.IdentityMapping):
        got = identity_skip.gpu_backward(grad, x, alpha, mask, backend="triton")
    else:
        m = mapping.to(DEVICE)
        got = permutation_skip.gpu_backward(grad, x, m.index, m.inverse, alpha, mask, backend="triton")
    return tuple(None if t is None else t.cpu() for t in got)


@triton_only
@pytest.mark.parametrize("with_branch", [True, False], ids=["branch", "nobranch"])
@pytest.mark.parametrize("lead", [(1,), (3, 11), (0,)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_triton_matches_reference(kind, dtype, lead, with_branch, poisoned):
    _check(kind, dtype, lead, with_branch, _triton_forward, _triton_backward, d=300)


@triton_only
@pytest.mark.parametrize("kind", KINDS)
def test_triton_non_contiguous_and_deterministic(kind, poisoned):
    mapping = _mapping(kind, 40)
    base, bbase, grad, alpha = _inputs((5, 3, 80), torch.float32)
    x, branch = base[..., :40].transpose(0, 1), bbase[..., 1::2].transpose(0, 1)
    y = _triton_forward(mapping, x, branch, alpha)
    assert_close(y, _reference(kind, mapping, x.double(), branch.double(), alpha.double()), torch.float32, "y")
    g = grad[..., :40].transpose(0, 1)
    first, second = (_triton_backward(mapping, g, x, alpha, [True, True]) for _ in range(2))
    assert all(torch.equal(u, v) for u, v in zip(first, second))
    xr, ar = x.double().requires_grad_(), alpha.double().requires_grad_()
    dx_ref, da_ref = torch.autograd.grad(_reference(kind, mapping, xr, None, ar), (xr, ar), g.double())
    assert_close(first[0], dx_ref, torch.float32, "dx")
    assert_close(first[1], da_ref, torch.float32, "dalpha", scale=(g.double() * xr).abs().sum().item())


@triton_only
def test_gpu_path_validates_the_permutation():
    p = mappings.permutation(16, seed=6)
    x, branch, _, alpha = _inputs((2, 16), torch.float32)
    bad = p.index.clone()
    bad[1] = bad[0].item()
    with pytest.raises(ValueError, match="index must be a permutation"):
        permutation_skip.gpu_forward(x, bad, p.inverse, alpha, branch, backend="triton")
    with pytest.raises(ValueError, match="inverse is not the inverse permutation"):
        permutation_skip.gpu_forward(x, p.index, p.index.flip(0), alpha, branch, backend="triton")
    with pytest.raises(ValueError, match="branch must have x's shape"):
        identity_skip.gpu_forward(x, alpha, branch[:, :4], backend="triton")
    with pytest.raises(TypeError, match="branch has dtype"):
        identity_skip.gpu_forward(x, alpha, branch.double(), backend="triton")


@pytest.mark.parametrize("op", ["identity_skip_add", "identity_skip_add_backward", "permutation_skip_add",
                                "permutation_skip_add_backward"])
def test_public_ops_have_a_cuda_implementation(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"entskip::{op}", "CUDA")


# ----------------------------------------------------------------------------------------
# Features first: x (N, D, S), the permutation acting on dim 1 (an NCHW map as (N, C, H * W)).

FF_SHAPES = [(2, 16, 49), (1, 40, 1), (3, 7, 15), (2, 33, 196), (1, 8, 33), (0, 8, 9), (2, 5, 0)]


def _ff_reference(mapping, x, branch, alpha):
    y = alpha * x.index_select(1, mapping.index)
    return y if branch is None else y + branch


def _check_ff(shape, dtype, with_branch, forward, backward, seed=0, view=lambda t: t):
    mapping = _mapping("permutation", shape[1])
    x, branch, grad, alpha = (view(t) if t.dim() == 3 else t for t in _inputs(shape, dtype, seed))
    branch = branch if with_branch else None
    y = forward(mapping, x, branch, alpha)
    dx, dalpha = backward(mapping, grad, x, alpha, [True, True])
    xr, ar = x.double().requires_grad_(), alpha.double().requires_grad_()
    y_ref = _ff_reference(mapping, xr, None if branch is None else branch.double(), ar)
    dx_ref, dalpha_ref = torch.autograd.grad(y_ref, (xr, ar), grad.double(), allow_unused=True)
    dalpha_ref = torch.zeros((), dtype=torch.float64) if dalpha_ref is None else dalpha_ref
    assert y.shape == x.shape and y.is_contiguous()
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    assert_close(dalpha, dalpha_ref, dtype, "dalpha", scale=max((grad.double() * x.double()).abs().sum().item(), 1.0))
    for mask in ([True, False], [False, True]):
        assert [t is not None for t in backward(mapping, grad, x, alpha, mask)] == mask


def _cpu_ff_forward(mapping, x, branch, alpha):
    return OPS.permutation_skip_add(x, mapping.index, mapping.inverse, alpha, branch, True)


def _cpu_ff_backward(mapping, grad, x, alpha, mask):
    return OPS.permutation_skip_add_backward(grad, x, mapping.index, mapping.inverse, alpha, mask, True)


@pytest.mark.parametrize("with_branch", [True, False], ids=["branch", "nobranch"])
@pytest.mark.parametrize("shape", FF_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_features_first_matches_reference(dtype, shape, with_branch, poisoned, cpu_backend):
    _check_ff(shape, dtype, with_branch, _cpu_ff_forward, _cpu_ff_backward)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_features_first_strided(dtype, poisoned, cpu_backend):
    # rows of S positions with a row stride (read in place), and positions with a stride (copied)
    _check_ff((2, 12, 30), dtype, True, _cpu_ff_forward, _cpu_ff_backward, view=lambda t: t[..., :20])
    _check_ff((2, 12, 30), dtype, True, _cpu_ff_forward, _cpu_ff_backward, view=lambda t: t[..., ::2])
    _check_ff((4, 12, 30), dtype, True, _cpu_ff_forward, _cpu_ff_backward, view=lambda t: t[::2])


def test_features_first_requires_three_dims(cpu_backend):
    p = mappings.permutation(8, seed=0)
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"features-first x must be \(N, D, S\)"):
        OPS.permutation_skip_add(x, p.index, p.inverse, torch.tensor(0.5), None, True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_opcheck_features_first(dtype, cpu_backend):
    p = mappings.permutation(12, seed=3)
    x, branch, grad, alpha = _inputs((3, 12, 10), dtype)
    x.requires_grad_()
    alpha.requires_grad_()
    torch.library.opcheck(OPS.permutation_skip_add.default, (x, p.index, p.inverse, alpha, branch.requires_grad_(), True))
    for mask in ([True, True], [True, False], [False, True]):
        torch.library.opcheck(OPS.permutation_skip_add_backward.default,
                              (grad, x.detach(), p.index, p.inverse, alpha.detach(), mask, True))


def test_features_first_deterministic_across_thread_counts(cpu_backend):
    p = mappings.permutation(64, seed=1)
    x, _, grad, alpha = _inputs((9, 64, 49), torch.float32, seed=4)
    previous = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = OPS.permutation_skip_add_backward(grad, x, p.index, p.inverse, alpha, [True, True], True)
    finally:
        torch.set_num_threads(previous)
    for threads in (2, 3):
        assert all(torch.equal(u, v) for u, v in zip(results[1], results[threads]))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_skip_add_nchw_permutation_reads_in_place(fmt, cpu_backend):
    """skip_add(feature_dim=1) of an NCHW (or channels_last) map: no copy of x or the branch,
    the result in x's format, forward and gradients as the reference."""
    p = mappings.permutation(16, seed=2)
    gen = torch.Generator().manual_seed(5)
    x, r, g = (torch.randn(2, 16, 7, 5, generator=gen).to(memory_format=fmt) for _ in range(3))
    alpha = torch.tensor(0.8)
    with torch.profiler.profile() as prof:
        y = entskip.skip_add(x, p, r, alpha, feature_dim=1)
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert copies == []
    assert y.is_contiguous(memory_format=fmt)
    xr, rr, ar = (t.double().requires_grad_() for t in (x, r, alpha))
    leaves = (x.requires_grad_(), r.requires_grad_(), alpha.requires_grad_())
    y = entskip.skip_add(leaves[0], p, leaves[1], leaves[2], feature_dim=1)
    y_ref = ar * xr.index_select(1, p.index) + rr
    torch.testing.assert_close(y.double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(y_ref, (xr, rr, ar), g.double())
    for u, v in zip(got, want):
        torch.testing.assert_close(u.double(), v, rtol=1e-5, atol=1e-4)


@triton_only
@pytest.mark.parametrize("shape", [(2, 16, 49), (1, 7, 15), (0, 8, 9)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_features_first_matches_reference(dtype, shape, poisoned):
    def forward(m, x, branch, alpha):
        m = m.to(DEVICE)
        return permutation_skip.gpu_forward(x.to(DEVICE), m.index, m.inverse, alpha.to(DEVICE),
                                            None if branch is None else branch.to(DEVICE), "triton", True).cpu()

    def backward(m, grad, x, alpha, mask):
        m = m.to(DEVICE)
        got = permutation_skip.gpu_backward(grad.to(DEVICE), x.to(DEVICE), m.index, m.inverse, alpha.to(DEVICE), mask,
                                            "triton", True)
        return tuple(None if t is None else t.cpu() for t in got)

    _check_ff(shape, dtype, True, forward, backward)


def test_compile_fullgraph_nchw_permutation(cpu_backend):
    p = mappings.permutation(16, seed=2)
    gen = torch.Generator().manual_seed(6)
    x, r = (torch.randn(2, 16, 5, 3, generator=gen) for _ in range(2))
    alpha = torch.tensor(0.9, requires_grad=True)

    def f(x, r, a):
        return entskip.skip_add(x, p, r, a, feature_dim=1)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y, y_ref = compiled(x, r, alpha), f(x, r, alpha)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), alpha)[0], torch.autograd.grad(y_ref.sum(), alpha)[0])
