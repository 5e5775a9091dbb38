"""The features-first format (issue #16): NCHW activations without transposes.

The BSR and dense ops take ``x (N, D_in, S)`` as well as ``(rows, D_in)``; ``skip_add(...,
feature_dim=1)`` passes a contiguous NCHW map to them as its ``(N, C, H * W)`` view, and a
``channels_last`` one features last. Every result and gradient is compared with the
float64 reference on fresh random inputs, with outputs poisoned (NaN-filled ``empty``).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import entskip
from entskip import bsr_skip, dense_skip, mappings, reference
from entskip.mappings import BlockSparseMapping, DenseMapping

from conftest import assert_close

pytestmark = pytest.mark.usefixtures("cpu_backend")

FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _plain(mapping: mappings.Mapping, dtype) -> mappings.Mapping:
    """A learnable copy of ``mapping`` in ``dtype`` with its matrix stored as a plain parameter."""
    if isinstance(mapping, BlockSparseMapping):
        return BlockSparseMapping(mapping.layout, mapping.blocks.detach().to(dtype), learnable=True)
    return DenseMapping(mapping.matrix().detach().to(dtype), learnable=True)


def _param(mapping):
    return mapping.blocks if isinstance(mapping, BlockSparseMapping) else mapping.weight


def _matrix64(mapping, param64):
    """The dense float64 ``M`` as a differentiable function of ``param64`` (a copy of the parameter)."""
    if isinstance(mapping, BlockSparseMapping):
        lay = mapping.layout
        return reference.bsr_to_dense(param64, lay.crow_indices, lay.col_indices, lay.shape)
    return param64


def _randn(gen, *shape, dtype, fmt=torch.contiguous_format):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return t.contiguous(memory_format=fmt) if t.dim() == 4 else t


def _check_skip_add(mapping, n, h, w, dtype, fmt, seed=0, branch=True):
    """skip_add(feature_dim=1) on an (n, C, h, w) map against the float64 reference: y and every gradient."""
    m = _plain(mapping, dtype)
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out = m.in_features, m.out_features
    x = _randn(gen, n, c_in, h, w, dtype=dtype, fmt=fmt).requires_grad_()
    r = _randn(gen, n, c_out, h, w, dtype=dtype, fmt=fmt).requires_grad_() if branch else None
    alpha = torch.tensor(0.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
    y = entskip.skip_add(x, m, r, alpha, feature_dim=1)
    assert y.is_contiguous(memory_format=fmt), "the result keeps x's memory format"
    g = _randn(gen, *y.shape, dtype=dtype, fmt=fmt)
    y.backward(g)

    x64, p64 = x.detach().double().requires_grad_(), _param(m).detach().double().requires_grad_()
    a64 = alpha.detach().double().requires_grad_()
    M = _matrix64(m, p64)
    y64 = a64 * torch.einsum("oc,nchw->nohw", M, x64)
    if branch:
        y64 = y64 + r.detach().double()
    y64.backward(g.double())
    assert_close(y, y64, dtype, "y")
    assert_close(x.grad, x64.grad, dtype, "dx")
    # Reductions over N * S: scaled by the sum of their terms' magnitudes (their condition).
    gx = torch.einsum("nohw,nchw->oc", g.double().abs(), x.detach().double().abs())
    assert_close(_param(m).grad, p64.grad, dtype, "dM", scale=max(float(gx.max()), 1.0))
    assert_close(alpha.grad, a64.grad, dtype, "dalpha", scale=max(float((gx * M.detach().abs()).sum()), 1.0))
    if branch:
        assert torch.equal(r.grad, g), "dbranch is the upstream gradient"


BSR_MAPPINGS = {
    "sparse16": lambda: mappings.sparse(64, density=0.5, block=16, seed=1),
    "sparse32_quarter": lambda: mappings.sparse(256, density=0.25, block=32, seed=2),
    "block_orthogonal16": lambda: mappings.block_orthogonal(48, block=16, seed=3),
    "block_orthogonal32": lambda: mappings.block_orthogonal(64, block=32, seed=4),
    "structural8": lambda: mappings.structural(40, block=8),  # 40 channels: not a multiple of any SIMD width
    "sparse12": lambda: mappings.sparse(36, density=2 / 3, block=12, seed=5),  # b = 12: rows pad to micro-tiles
}
DENSE_MAPPINGS = {
    "orthogonal": lambda: mappings.orthogonal(24, seed=6),
    "rectangular": lambda: DenseMapping(torch.randn(20, 36, generator=torch.Generator().manual_seed(7))),
}
SPATIAL = [(7, 7), (1, 1), (3, 5)]


@pytest.mark.parametrize("fmt", FORMATS, ids=list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(BSR_MAPPINGS) + list(DENSE_MAPPINGS))
def test_skip_add_nchw_matches_reference(name, dtype, fmt, poisoned):
    make = {**BSR_MAPPINGS, **DENSE_MAPPINGS}[name]
    for n, (h, w) in zip((2, 1, 3), SPATIAL):
        _check_skip_add(make(), n, h, w, dtype, FORMATS[fmt], seed=n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_skip_add_nchw_without_branch_and_wide_spatial(dtype, poisoned):
    # S = 300: several micro-tile chunks and a tail; 2 images; no branch.
    _check_skip_add(mappings.sparse(64, density=0.5, block=16, seed=8), 2, 15, 20, dtype, torch.contiguous_format,
                    branch=False)
    _check_skip_add(mappings.orthogonal(32, seed=9), 2, 15, 20, dtype, torch.contiguous_format, branch=False)


@pytest.mark.parametrize("mapping", [None, "permutation"])
def test_elementwise_mappings_on_nchw(mapping, poisoned):
    m = None if mapping is None else mappings.permutation(16, seed=1)
    gen = torch.Generator().manual_seed(0)
    x, r = _randn(gen, 2, 16, 3, 5, dtype=torch.float64), _randn(gen, 2, 16, 3, 5, dtype=torch.float64)
    y = entskip.skip_add(x, m, r, 0.6, feature_dim=1)
    M = torch.eye(16, dtype=torch.float64) if m is None else m.matrix().double()
    assert_close(y, 0.6 * torch.einsum("oc,nchw->nohw", M, x) + r, torch.float64, "y")


# --- the ops' 3-D format directly ------------------------------------------------------

def _bsr_args(mapping, dtype):
    return (mapping.blocks.detach().to(dtype), *mapping.layout.tensors())


def _op_inputs(d_in, d_out, n, s, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (_randn(gen, n, d_in, s, dtype=dtype), _randn(gen, n, d_out, s, dtype=dtype),
            _randn(gen, n, d_out, s, dtype=dtype))


def _alpha(dtype, value=0.7):
    return torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,s", [(0, 7), (3, 0), (1, 1), (2, 17), (5, 64), (3, 49)])
def test_bsr_ops_3d_match_reference(dtype, n, s, poisoned):
    _check_bsr_3d(mappings.sparse(64, density=0.5, block=16, seed=3), dtype, n, s)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("s", [700, 1100])
def test_bsr_ops_3d_several_spatial_tiles(dtype, s, poisoned):
    """256 features: the products split S into 2 to 5 tiles of equal width (a multiple of the
    micro-kernel's chunk) and a shorter last one."""
    _check_bsr_3d(mappings.sparse(256, density=0.25, block=32, seed=4), dtype, 2, s)


def _check_bsr_3d(m, dtype, n, s):
    """The 3-D BSR ops (forward, dx, dvalues, dalpha) against the float64 reference."""
    d = m.in_features
    values, *layout = _bsr_args(m, dtype)
    x, r, g = _op_inputs(d, d, n, s, dtype)
    a = _alpha(dtype)
    y = torch.ops.entskip.bsr_skip_add(x, values, *layout, a, r)
    M = m.matrix().double()
    assert_close(y, 0.7 * (M @ x.double()) + r.double(), dtype, "y")
    dx, dv, da = torch.ops.entskip.bsr_skip_add_backward(g, x, values, *layout, a, [True, True, True])
    assert_close(dx, 0.7 * (M.T @ g.double()), dtype, "dx")
    full = torch.einsum("nos,ncs->oc", g.double(), x.double())
    lay = m.layout
    rows = reference.block_rows(lay.crow_indices)
    b = lay.block
    sampled = torch.stack([full[i * b:(i + 1) * b, j * b:(j + 1) * b] for i, j in zip(rows.tolist(), lay.col_indices.tolist())])
    scale = max(float(torch.einsum("nos,ncs->oc", g.double().abs(), x.double().abs()).max()), 1.0)
    assert_close(dv, 0.7 * sampled, dtype, "dvalues", scale=scale)
    assert_close(da, (sampled * values.double()).sum(), dtype, "dalpha", scale=scale * values.numel())
    assert dx.shape == x.shape and y.shape == r.shape


@pytest.mark.parametrize("dtype, n, s", [(torch.float32, 4, 5488), (torch.float64, 3, 4112), (torch.float32, 4, 5474)],
                         ids=["float32", "float64", "float32-unaligned"])
def test_bsr_3d_large_outputs_are_streamed_correctly(dtype, n, s, poisoned):
    """Features-first outputs of 4 MiB or more whose rows are whole 64-byte lines (S a
    multiple of 16 float32 or 8 float64 positions) are written by non-temporal stores, a
    tile's partial last chunk among them; rows that are not (S = 5474) through the cache."""
    _check_bsr_3d(mappings.sparse(64, density=0.5, block=16, seed=6), dtype, n, s)


@pytest.mark.parametrize("path", ["amx", "avx512"])
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("n,s", [(1, 1), (2, 15), (2, 30), (3, 49), (1, 76), (2, 100), (1, 197)])
def test_bfloat16_bsr_3d_paths_match_reference(path, block, n, s, monkeypatch, poisoned):
    """bfloat16 NCHW maps on AMX tiles (entskip._C.amx) and on the AVX-512 paths: forward,
    dx and the sampled dvalues against the float64 reference, spatial sizes whose last
    48-position unit ends in its first, second or third 16-position tile."""
    import entskip._C

    if path == "amx" and not entskip._C.amx:
        pytest.skip("this CPU has no AMX-BF16 tiles")
    monkeypatch.setenv("ENTSKIP_CPU_AMX", "1" if path == "amx" else "0")
    m = mappings.sparse(4 * block, density=0.5, block=block, seed=3, construction="random")
    values, *layout = _bsr_args(m, torch.bfloat16)
    x, r, g = _op_inputs(4 * block, 4 * block, n, s, torch.bfloat16, seed=block + s)
    a = _alpha(torch.bfloat16)
    M = m.matrix().double()
    y = torch.ops.entskip.bsr_skip_add(x, values, *layout, a, r)
    assert_close(y, 0.7 * (M @ x.double()) + r.double(), torch.bfloat16, "y")
    dx, dv, _ = torch.ops.entskip.bsr_skip_add_backward(g, x, values, *layout, a, [True, True, False])
    assert_close(dx, 0.7 * (M.T @ g.double()), torch.bfloat16, "dx")
    full = torch.einsum("nos,ncs->oc", g.double(), x.double())
    rows = reference.block_rows(m.layout.crow_indices)
    sampled = torch.stack([full[i * block:(i + 1) * block, j * block:(j + 1) * block]
                           for i, j in zip(rows.tolist(), m.layout.col_indices.tolist())])
    scale = max(float(torch.einsum("nos,ncs->oc", g.double().abs(), x.double().abs()).max()), 1.0)
    assert_close(dv, 0.7 * sampled, torch.bfloat16, "dvalues", scale=scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,s", [(0, 7), (1, 1), (3, 49)])
def test_dense_ops_3d_match_reference(dtype, n, s, poisoned):
    W = torch.randn(20, 36, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    x, r, g = _op_inputs(36, 20, n, s, dtype)
    a = _alpha(dtype)
    y = torch.ops.entskip.dense_skip_add(x, W, a, r)
    assert_close(y, 0.7 * (W.double() @ x.double()) + r.double(), dtype, "y")
    dx, dw, da = torch.ops.entskip.dense_skip_add_backward(g, x, W, a, [True, True, True])
    full = torch.einsum("nos,ncs->oc", g.double(), x.double())
    scale = max(float(torch.einsum("nos,ncs->oc", g.double().abs(), x.double().abs()).max()), 1.0)
    assert_close(dx, 0.7 * (W.double().T @ g.double()), dtype, "dx")
    assert_close(dw, 0.7 * full, dtype, "dweight", scale=scale)
    assert_close(da, (full * W.double()).sum(), dtype, "dalpha", scale=scale * W.numel())


@pytest.mark.parametrize("path", ["amx", "avx512_bf16", "gemm"])
@pytest.mark.parametrize("d_out,d_in", [(128, 192), (64, 96), (48, 32)], ids=["b64", "b32", "b16"])
@pytest.mark.parametrize("n,s", [(2, 49), (1, 197)])
def test_dense_bfloat16_nchw_blockwise_paths_match_reference(path, d_out, d_in, n, s, monkeypatch, poisoned):
    """bfloat16 NCHW maps whose W is whole 64/32/16 blocks: on AMX tiles y and dx by the
    features-first block kernel and dW by the sampled product over all of W's blocks; with
    AVX512-BF16 dot products (ENTSKIP_CPU_AMX=0) dW by that sampled product, y and dx by a
    GEMM per image; with neither (ENTSKIP_CPU_AVX512_BF16=0 too) GEMMs per image."""
    import entskip._C

    if path == "amx" and not entskip._C.amx:
        pytest.skip("this CPU has no AMX-BF16 tiles")
    if path == "avx512_bf16" and not entskip._C.avx512_bf16:
        pytest.skip("this build has no AVX512-BF16 kernels")
    monkeypatch.setenv("ENTSKIP_CPU_AMX", "1" if path == "amx" else "0")
    monkeypatch.setenv("ENTSKIP_CPU_AVX512_BF16", "0" if path == "gemm" else "1")
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(torch.bfloat16)
    x, r, g = _op_inputs(d_in, d_out, n, s, torch.bfloat16, seed=s)
    a = _alpha(torch.bfloat16)
    y = torch.ops.entskip.dense_skip_add(x, W, a, r)
    assert_close(y, 0.7 * (W.double() @ x.double()) + r.double(), torch.bfloat16, "y")
    dx, dw, da = torch.ops.entskip.dense_skip_add_backward(g, x, W, a, [True, True, True])
    assert_close(dx, 0.7 * (W.double().T @ g.double()), torch.bfloat16, "dx")
    full = torch.einsum("nos,ncs->oc", g.double(), x.double())
    scale = max(float(torch.einsum("nos,ncs->oc", g.double().abs(), x.double().abs()).max()), 1.0)
    assert_close(dw, 0.7 * full, torch.bfloat16, "dweight", scale=scale)
    assert_close(da, (full * W.double()).sum(), torch.bfloat16, "dalpha", scale=scale * W.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dense_3d_results_do_not_depend_on_the_thread_count(dtype):
    """y, dx, dW and dalpha of a dense NCHW map, bitwise on 1, 2 and 3 threads (dW sums
    fixed groups of images, or every block in a fixed order)."""
    W = torch.randn(128, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    x, r, g = _op_inputs(64, 128, 9, 49, dtype, seed=4)
    a = _alpha(dtype)

    def run():
        y = torch.ops.entskip.dense_skip_add(x, W, a, r)
        return (y, *torch.ops.entskip.dense_skip_add_backward(g, x, W, a, [True, True, True]))

    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name, u, v in zip(("y", "dx", "dW", "dalpha"), results[0], other):
            assert torch.equal(u, v), name


def test_3d_ops_read_non_contiguous_inputs():
    m = mappings.sparse(64, density=0.5, block=16, seed=2)
    values, *layout = _bsr_args(m, torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 64, generator=gen, dtype=torch.float64).transpose(1, 2)  # (5, 64, 7), not contiguous
    r = torch.randn(5, 7, 64, generator=gen, dtype=torch.float64).transpose(1, 2)
    a = _alpha(torch.float64)
    y = torch.ops.entskip.bsr_skip_add(x, values, *layout, a, r)
    assert_close(y, 0.7 * (m.matrix().double() @ x) + r, torch.float64, "y")
    W = m.matrix().double()
    assert_close(torch.ops.entskip.dense_skip_add(x, W, a, r), 0.7 * (W @ x) + r, torch.float64, "dense y")


def test_3d_bad_inputs_name_the_argument():
    m = mappings.sparse(64, density=0.5, block=16, seed=2)
    values, *layout = _bsr_args(m, torch.float32)
    x, r, g = _op_inputs(64, 64, 2, 5, torch.float32)
    a = _alpha(torch.float32)
    with pytest.raises(RuntimeError, match="branch must have shape"):
        torch.ops.entskip.bsr_skip_add(x, values, *layout, a, r[:, :, :4])
    with pytest.raises(RuntimeError, match="branch must have shape"):
        torch.ops.entskip.bsr_skip_add(x, values, *layout, a, r.mT.contiguous())
    with pytest.raises(RuntimeError, match="grad must have shape"):
        torch.ops.entskip.bsr_skip_add_backward(g[:1], x, values, *layout, a, [True, True, True])
    with pytest.raises(RuntimeError, match="x must be 2-D .* or 3-D"):
        torch.ops.entskip.bsr_skip_add(x.unsqueeze(0), values, *layout, a, None)
    with pytest.raises(RuntimeError, match="x has 31 features"):
        torch.ops.entskip.bsr_skip_add(x[:, :31], values, *layout, a, None)
    W = torch.randn(64, 64)
    with pytest.raises(RuntimeError, match="branch must have shape"):
        torch.ops.entskip.dense_skip_add(x, W, a, r[:1])
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.entskip.dense_skip_add(x, W[:, :16], a, r)
    with pytest.raises(RuntimeError, match="grad must have shape"):
        torch.ops.entskip.dense_skip_add_backward(g[:, :16], x, W, a, [True, True, True])


def test_ops_never_return_uninitialised_memory():
    """Outside deterministic mode: NaN-filled memory freed just before, then finite results only."""
    m = mappings.sparse(128, density=0.25, block=16, seed=4)
    values, *layout = _bsr_args(m, torch.float32)
    x, r, g = _op_inputs(128, 128, 3, 49, torch.float32)
    a = _alpha(torch.float32)
    for _ in range(3):
        poison = torch.full((3 * 128 * 49,), float("nan"))  # the size of each result, freed for the ops to reuse
        del poison
        y = torch.ops.entskip.bsr_skip_add(x, values, *layout, a, None)
        dx, dv, da = torch.ops.entskip.bsr_skip_add_backward(g, x, values, *layout, a, [True, True, True])
        yd = torch.ops.entskip.dense_skip_add(x, m.matrix(), a, None)
        for t in (y, dx, dv, da, yd):
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_3d_results_do_not_depend_on_the_thread_count(dtype):
    m = mappings.sparse(256, density=0.25, block=32, seed=5)
    values, *layout = _bsr_args(m, dtype)
    x, r, g = _op_inputs(256, 256, 9, 200, dtype)
    a = _alpha(dtype)
    W = m.matrix().to(dtype)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append([torch.ops.entskip.bsr_skip_add(x, values, *layout, a, r),
                            *torch.ops.entskip.bsr_skip_add_backward(g, x, values, *layout, a, [True, True, True]),
                            *torch.ops.entskip.dense_skip_add_backward(g, x, W, a, [False, True, True])[1:]])
    finally:
        torch.set_num_threads(previous)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_gradcheck_float64_nchw():
    for make in (lambda: mappings.sparse(64, density=0.5, block=16, seed=1), lambda: mappings.orthogonal(8, seed=2)):
        m = _plain(make(), torch.float64)
        c = m.in_features
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, c, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
        r = torch.randn(2, c, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
        alpha = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
        p = _param(m)
        assert torch.autograd.gradcheck(lambda x, r, a: entskip.skip_add(x, m, r, a, feature_dim=1), (x, r, alpha))
        x3 = x.detach().reshape(2, c, 6)
        if isinstance(m, BlockSparseMapping):
            lay = m.layout.tensors()
            fn = lambda v: torch.ops.entskip.bsr_skip_add(x3, v, *lay, alpha.detach(), None)  # noqa: E731
        else:
            fn = lambda v: torch.ops.entskip.dense_skip_add(x3, v, alpha.detach(), None)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (p.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("kind", ["bsr", "dense"])
def test_second_derivative_raises(kind, fmt):
    """The BSR and dense ops are differentiable once: under create_graph=True the first
    derivatives (dx, dM, dalpha) are the ordinary ones, and a second backward through them
    raises instead of coming out silently wrong; dbranch (the incoming gradient) stays
    differentiable."""
    make = {"bsr": lambda: mappings.sparse(32, density=0.5, block=8, seed=1),
            "dense": lambda: mappings.orthogonal(32, seed=2)}[kind]
    m = _plain(make(), torch.float64)
    gen = torch.Generator().manual_seed(0)
    x, r, g = (torch.randn(2, 32, 3, 2, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
               for _ in range(3))
    for t in (x, r, g):
        t.requires_grad_()
    alpha = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    p = _param(m)
    inputs = (x, p, alpha, r)
    firsts = torch.autograd.grad(entskip.skip_add(x, m, r, alpha, feature_dim=1), inputs, g, create_graph=True)
    M = m.matrix()
    ref = alpha * torch.einsum("oc,nchw->nohw", M, x) + r
    for got, want in zip(firsts, torch.autograd.grad(ref, inputs, g)):
        torch.testing.assert_close(got.detach(), want)
    for first in firsts[:3]:
        with pytest.raises(RuntimeError, match="differentiable once"):
            first.sum().backward(retain_graph=True)
    torch.testing.assert_close(torch.autograd.grad(firsts[3].sum(), g)[0], torch.ones_like(g))


def test_opcheck_3d_forms():
    m = mappings.sparse(64, density=0.5, block=16, seed=1)
    values, *layout = _bsr_args(m, torch.float32)
    x, r, g = _op_inputs(64, 64, 2, 5, torch.float32)
    a = _alpha(torch.float32)
    W = m.matrix()
    torch.library.opcheck(torch.ops.entskip.bsr_skip_add.default,
                          (x.requires_grad_(), values.requires_grad_(), *layout, a.requires_grad_(), r))
    torch.library.opcheck(torch.ops.entskip.bsr_skip_add_backward.default,
                          (g, x.detach(), values.detach(), *layout, a.detach(), [True, True, True]))
    torch.library.opcheck(torch.ops.entskip.dense_skip_add.default, (x.detach().requires_grad_(), W.requires_grad_(),
                                                                    a.detach().requires_grad_(), r))
    torch.library.opcheck(torch.ops.entskip.dense_skip_add_backward.default,
                          (g, x.detach(), W.detach(), a.detach(), [True, True, True]))


class _Recorder(TorchDispatchMode):
    """Records every op dispatched below it: (op, args), or with ``keep_args=False`` (op, the
    largest tensor argument's numel), which holds no reference to the tensors."""

    def __init__(self, keep_args=True):
        super().__init__()
        self.calls = []
        self.keep_args = keep_args

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.keep_args:
            self.calls.append((func, args))
        else:
            self.calls.append((func, max((a.numel() for a in args if isinstance(a, torch.Tensor)), default=0)))
        return func(*args, **(kwargs or {}))


COPIES = {"aten.clone.default", "aten.copy_.default", "aten._to_copy.default", "aten.contiguous.default"}


@pytest.mark.parametrize("kind", ["bsr", "dense", "identity"])
def test_nchw_passes_views_and_copies_nothing(kind):
    """The op sees x, the branch and the upstream gradient in place (their data pointers), and no
    copy op runs on a tensor of their size, forward or backward."""
    m = {"bsr": lambda: _plain(mappings.sparse(64, density=0.5, block=16, seed=1), torch.float32),
         "dense": lambda: _plain(mappings.orthogonal(64, seed=1), torch.float32), "identity": lambda: None}[kind]()
    op = {"bsr": "entskip.bsr_skip_add", "dense": "entskip.dense_skip_add", "identity": "entskip.identity_skip_add"}[kind]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 7, 7, generator=gen, requires_grad=True)
    r = torch.randn(2, 64, 7, 7, generator=gen, requires_grad=True)
    g = torch.randn(2, 64, 7, 7, generator=gen)
    alpha = torch.tensor(0.5, requires_grad=True)
    with _Recorder() as rec:
        y = entskip.skip_add(x, m, r, alpha, feature_dim=1)
        y.backward(g)
    names = [str(f) for f, _ in rec.calls]
    forward = [args for f, args in rec.calls if str(f) == op + ".default"]
    backward = [args for f, args in rec.calls if str(f) == op + "_backward.default"]
    assert len(forward) == 1 and len(backward) == 1, names
    fx = forward[0][0]
    assert fx.dim() == 3 and fx.data_ptr() == x.data_ptr(), "the op reads x in place (features first)"
    branch_arg = forward[0][-1]
    assert branch_arg.data_ptr() == r.data_ptr(), "the op reads the branch in place"
    assert backward[0][0].data_ptr() == g.data_ptr(), "the backward reads the upstream gradient in place"
    big = x.numel()
    copies = [n for (f, args), n in zip(rec.calls, names)
              if n in COPIES and any(isinstance(a, torch.Tensor) and a.numel() >= big for a in args)]
    assert not copies, copies
    assert y.is_contiguous()


@pytest.mark.parametrize("kind", ["bsr", "dense", "identity", "permutation"])
@pytest.mark.parametrize("shape,fmt", [((2, 64, 7, 7), torch.contiguous_format), ((2, 64, 7, 7), torch.channels_last),
                                       ((2, 7, 64), torch.contiguous_format)],
                         ids=["nchw", "channels_last", "features_last_3d"])
def test_in_place_op_on_the_result_copies_nothing(kind, shape, fmt):
    """A ResNet block's ReLU(inplace=True) on the skip's result: the result is not a view of
    the op's output, so autograd does not rebase the in-place op (CopySlices: a clone and two
    copies of the gradient) and the gradients are those of the out-of-place ReLU."""
    m = {"bsr": lambda: _plain(mappings.sparse(64, density=0.5, block=16, seed=1), torch.float32),
         "dense": lambda: _plain(mappings.orthogonal(64, seed=1), torch.float32), "identity": lambda: None,
         "permutation": lambda: mappings.permutation(64, seed=1)}[kind]()
    feature_dim = 1 if len(shape) == 4 else -1
    gen = torch.Generator().manual_seed(0)
    x, r, g = (torch.randn(*shape, generator=gen).contiguous(memory_format=fmt) for _ in range(3))
    x.requires_grad_()
    r.requires_grad_()
    alpha = torch.tensor(0.5, requires_grad=True)
    with _Recorder(keep_args=False) as rec:  # holding the args would keep autograd from stealing grads
        y = entskip.skip_add(x, m, r, alpha, feature_dim=feature_dim)
        assert not y._is_view() and y.is_contiguous(memory_format=fmt)
        y.relu_()
        y.backward(g)
    copies = [str(f) for f, numel in rec.calls if str(f) in COPIES and numel >= x.numel()]
    assert not copies, copies
    grads = [t.grad for t in (x, r, alpha)]
    for t in (x, r, alpha):
        t.grad = None
    M = torch.eye(64) if m is None else m.matrix().detach()
    mixed = torch.einsum("oc,nchw->nohw", M, x) if len(shape) == 4 else x @ M.T
    (alpha * mixed + r).relu().backward(g)  # the reference, out of place
    for got, t in zip(grads, (x, r, alpha)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-5)


def test_channels_last_and_mixed_branch_formats():
    m = _plain(mappings.sparse(64, density=0.5, block=16, seed=1), torch.float64)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 3, 5, generator=gen, dtype=torch.float64)
    r = torch.randn(2, 64, 3, 5, generator=gen, dtype=torch.float64)
    expected = 0.5 * torch.einsum("oc,nchw->nohw", m.matrix().double(), x) + r
    cl = torch.channels_last
    for xf, rf in [(x, r.contiguous(memory_format=cl)), (x.contiguous(memory_format=cl), r)]:
        y = entskip.skip_add(xf, m, rf, 0.5, feature_dim=1)
        assert_close(y, expected, torch.float64, "y")
        assert y.is_contiguous(memory_format=torch.channels_last if xf.is_contiguous(memory_format=cl)
                               and not xf.is_contiguous() else torch.contiguous_format)


def test_empty_batch_nchw():
    m = mappings.sparse(64, density=0.5, block=16, seed=1)
    x = torch.randn(0, 64, 4, 4, requires_grad=True)
    y = entskip.skip_add(x, m, torch.randn(0, 64, 4, 4), 0.5, feature_dim=1)
    assert y.shape == (0, 64, 4, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_compile_fullgraph_nchw():
    m = mappings.sparse(64, density=0.5, block=16, seed=1)
    gen = torch.Generator().manual_seed(0)
    x, r = torch.randn(2, 64, 5, 5, generator=gen), torch.randn(2, 64, 5, 5, generator=gen)

    def f(x, r):
        return entskip.skip_add(x, m, r, 0.7, feature_dim=1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(x, r), f(x, r))
    xc = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(compiled(xc, r), f(xc, r))


# --- the CUDA C++ backend's copies, exercised on the CPU ------------------------------

@pytest.mark.parametrize("n,s", [(3, 10), (0, 7)])
def test_cuda_cpp_backend_gets_features_last_copies(monkeypatch, n, s):
    """gpu_forward/gpu_backward on backend 'cuda' hand the _cuda_* ops 2-D features-last copies of
    features-first tensors and return the results features first (the _cuda_* ops stand in for
    the CPU ops here: no GPU)."""
    seen = []

    def record(op):
        def run(*args):
            seen.append(args[0].dim())
            return op(*args)
        return run

    monkeypatch.setattr(torch.ops.entskip, "_cuda_bsr_skip_add", record(torch.ops.entskip.bsr_skip_add), raising=False)
    monkeypatch.setattr(torch.ops.entskip, "_cuda_bsr_skip_add_backward",
                        record(torch.ops.entskip.bsr_skip_add_backward), raising=False)
    monkeypatch.setattr(torch.ops.entskip, "_cuda_dense_skip_add", record(torch.ops.entskip.dense_skip_add),
                        raising=False)
    monkeypatch.setattr(torch.ops.entskip, "_cuda_dense_skip_add_backward",
                        record(torch.ops.entskip.dense_skip_add_backward), raising=False)
    m = mappings.sparse(64, density=0.5, block=16, seed=1)
    values, *layout = _bsr_args(m, torch.float64)
    x, r, g = _op_inputs(64, 64, n, s, torch.float64)
    a = _alpha(torch.float64)
    M = m.matrix().double()
    y = bsr_skip.gpu_forward(x, values, *layout, a, r, "cuda")
    assert y.shape == x.shape
    assert_close(y, 0.7 * (M @ x) + r, torch.float64, "y")
    dx, dv, da = bsr_skip.gpu_backward(g, x, values, *layout, a, [True, True, True], "cuda")
    assert_close(dx, 0.7 * (M.T @ g), torch.float64, "dx")
    ref = torch.ops.entskip.bsr_skip_add_backward(g, x, values, *layout, a, [True, True, True])
    assert_close(dv, ref[1], torch.float64, "dvalues")
    y = dense_skip.gpu_forward(x, M, a, r, "cuda")
    assert_close(y, 0.7 * (M @ x) + r, torch.float64, "dense y")
    dx, dw, da = dense_skip.gpu_backward(g, x, M, a, [True, True, True], "cuda")
    assert_close(dx, 0.7 * (M.T @ g), torch.float64, "dense dx")
    assert dx.is_contiguous() and dx.shape == x.shape
    assert seen == [2, 2, 2, 2], "the CUDA C++ ops get 2-D (features-last) tensors only"


def test_cuda_cpp_backend_checks_the_callers_tensors():
    """The CUDA C++ path checks the features-first tensors before copying them: a branch or
    grad whose N * S matches x's but whose shape does not is an error naming it, not a
    scrambled sum (the _cuda_* ops are never reached)."""
    m = mappings.sparse(64, density=0.5, block=16, seed=1)
    values, *layout = _bsr_args(m, torch.float64)
    x, _, _ = _op_inputs(64, 64, 2, 8, torch.float64)
    wrong = torch.randn(4, 64, 4, dtype=torch.float64)  # 16 positions, as x's 2 x 8
    a = _alpha(torch.float64)
    M = m.matrix().double()
    with pytest.raises(ValueError, match="branch"):
        bsr_skip.gpu_forward(x, values, *layout, a, wrong, "cuda")
    with pytest.raises(ValueError, match="grad"):
        bsr_skip.gpu_backward(wrong, x, values, *layout, a, [True, True, True], "cuda")
    with pytest.raises(ValueError, match="branch"):
        dense_skip.gpu_forward(x, M, a, wrong, "cuda")
    with pytest.raises(ValueError, match="grad"):
        dense_skip.gpu_backward(wrong, x, M, a, [True, True, True], "cuda")


@pytest.mark.parametrize("declared", [False, True])
def test_a_subclass_that_replaces_skip_add_2d_declares_its_formats(declared):
    """A Mapping subclass overriding skip_add_2d gets features-last (rows, D) activations
    unless it sets features_first itself: it does not inherit DenseMapping's flag."""
    seen = []

    class Logged(DenseMapping):
        if declared:
            features_first = True

        def skip_add_2d(self, x, branch, alpha):
            seen.append(x.dim())
            return super().skip_add_2d(x, branch, alpha)

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 8, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 8, 3, 5, generator=gen, dtype=torch.float64)
    r = torch.randn(2, 8, 3, 5, generator=gen, dtype=torch.float64)
    y = entskip.skip_add(x, Logged(w), r, 0.5, feature_dim=1)
    assert seen == [3 if declared else 2]
    assert Logged.any_rank is False
    assert_close(y, 0.5 * torch.einsum("oi,nihw->nohw", w, x) + r, torch.float64, "y")
