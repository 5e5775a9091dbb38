"""Every op and backend against the float64 reference, forward and all gradients."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import entskip
from entskip import mappings, reference

from conftest import RTOL, assert_close, make_mapping, mapping_matrix, stored_tensor

NATIVE_KINDS = ["orthogonal", "dense_rect", "dense_colmajor", "sparse", "sparse_full", "structural", "block_orthogonal", "bsr_rect"]
ALL_KINDS = NATIVE_KINDS + ["identity", "permutation"]
RECT = {"dense_rect", "bsr_rect"}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
LEADS = [(1,), (7,), (3, 100), (2, 3, 5), (2, 1, 3, 4)]  # rank 1..4; row counts off the micro-tile


def _run(mapping, x, branch, alpha, grad_out):
    """Forward and the gradients of x, M's storage, alpha and branch."""
    mat = stored_tensor(mapping)
    y = entskip.skip_add(x, mapping, branch, alpha)
    inputs = [t for t in (x, mat, alpha, branch) if t is not None]
    grads = torch.autograd.grad(y, inputs, grad_out)
    return y, grads


def _leaves(dtype, lead, d_in, d_out, with_branch, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=gen, dtype=torch.float64).to(dtype)
    branch = torch.randn(*lead, d_out, generator=gen, dtype=torch.float64).to(dtype) if with_branch else None
    grad_out = torch.randn(*lead, d_out, generator=gen, dtype=torch.float64).to(dtype)
    alpha = torch.tensor(0.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return x, branch, alpha, grad_out


def _check_against_reference(mapping64, dtype, lead, with_branch, seed=0):
    d_in, d_out = mapping64.in_features, mapping64.out_features
    x, branch, alpha, grad_out = _leaves(dtype, lead, d_in, d_out, with_branch, seed)
    mapping = copy.deepcopy(mapping64).to(dtype)
    ref_mapping = copy.deepcopy(mapping).double()  # the reference sees the same rounded values
    for m in (mapping, ref_mapping):
        if stored_tensor(m) is not None:
            stored_tensor(m).requires_grad_(True)

    def leaves(cast):
        return [None if t is None else cast(t).detach().requires_grad_(True) for t in (x, branch, alpha)]

    xk, bk, ak = leaves(lambda t: t)
    y, grads = _run(mapping, xk, bk, ak, grad_out)
    with entskip.use_backend("reference"):
        xr, br, ar = leaves(torch.Tensor.double)
        y_ref, grads_ref = _run(ref_mapping, xr, br, ar, grad_out.double())
    assert y.dtype == dtype and y.shape == (*lead, d_out)
    assert_close(y, y_ref, dtype, "y")
    names = [n for n, t in zip(("dx", "dM", "dalpha", "dbranch"), (x, stored_tensor(mapping), alpha, branch)) if t is not None]
    # dalpha sums N * D_out * D_in products that cancel: its scale is the sum of their magnitudes.
    terms = grad_out.double().abs() * (xr.detach().abs() @ mapping_matrix(ref_mapping).abs().mT)
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, dtype, name, scale=max(terms.sum().item(), 1.0) if name == "dalpha" else None)


@pytest.mark.parametrize("with_branch", [True, False], ids=["branch", "nobranch"])
@pytest.mark.parametrize("lead", LEADS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "kind, block",
    [(k, 8) for k in ALL_KINDS]  # block 8: the generic CPU loop; 16/32/64: the register-blocked micro-kernels
    + [(k, b) for k in ("sparse", "structural", "block_orthogonal", "bsr_rect") for b in (16, 32, 64)],
)
def test_cpu_backend_matches_reference(kind, block, dtype, lead, with_branch, poisoned, cpu_backend):
    dim, out_dim = 128, (192 if kind in RECT else 128)
    _check_against_reference(make_mapping(kind, dim, block, seed=3, out_dim=out_dim), dtype, lead, with_branch)


@pytest.mark.parametrize("dim", [128, 40], ids=["whole_blocks", "no_whole_blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["orthogonal", "dense_rect", "dense_colmajor"])
@pytest.mark.parametrize("mode", ["gemm", "blocks"])
def test_cpu_dense_paths_match_reference(mode, kind, dtype, dim, monkeypatch, poisoned, cpu_backend):
    """dense_skip_add.cpp runs y and dx through ATen's GEMM or, where that was slower, the block-row
    kernel over W's blocks (falling back to the GEMM when W has no whole 16/32/64 blocks), and dW of
    bfloat16 through the bfloat16 GEMM on the GEMM path: both, forced by ENTSKIP_CPU_DENSE_KERNEL,
    forward and gradients against the float64 reference."""
    monkeypatch.setenv("ENTSKIP_CPU_DENSE_KERNEL", mode)
    out_dim = dim + 64 if kind in RECT else dim
    _check_against_reference(make_mapping(kind, dim, 8, seed=5, out_dim=out_dim), dtype, (3, 37), True)


@pytest.mark.parametrize("mode", ["gemm", "blocks"])
@pytest.mark.parametrize("d_out, d_in", [(64, 0), (0, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_dense_zero_width(dtype, mode, d_out, d_in, monkeypatch, cpu_backend):
    """A weight with a zero dimension is whole blocks of any size: the block kernel must not divide by 0."""
    monkeypatch.setenv("ENTSKIP_CPU_DENSE_KERNEL", mode)
    x, w, r = (torch.randn(*shape).to(dtype) for shape in ((4, d_in), (d_out, d_in), (4, d_out)))
    alpha = torch.tensor(0.5)
    assert torch.equal(torch.ops.entskip.dense_skip_add(x, w, alpha, r), r)
    dx, _, _ = torch.ops.entskip.dense_skip_add_backward(r, x, w, alpha, [True, False, False])
    assert dx.shape == (4, d_in) and not dx.isnan().any() and (dx == 0).all()


@pytest.mark.parametrize("block", [16, 8], ids=["micro_kernel", "generic"])
def test_cpu_bsr_zero_input_width(block, cpu_backend):
    """One block row, no block columns: y = branch, dx has no columns (no division by the width)."""
    empty = torch.zeros(0, dtype=torch.int64)
    layout = (torch.tensor([0, 0]), empty, torch.tensor([0]), empty, empty)
    x, r = torch.randn(4, 0), torch.randn(4, block)
    values, alpha = torch.randn(0, block, block), torch.tensor(0.5)
    assert torch.equal(torch.ops.entskip.bsr_skip_add(x, values, *layout, alpha, r), r)
    dx, dv, _ = torch.ops.entskip.bsr_skip_add_backward(r, x, values, *layout, alpha, [True, True, False])
    assert dx.shape == (4, 0) and dv.shape == (0, block, block)


_FIRST_DENSE_CALLS = """
import os, torch, entskip
os.environ.pop("ENTSKIP_CPU_DENSE_KERNEL", None)
alpha = torch.tensor(1.0)
torch.manual_seed(0)
expected = torch.randn(3)
torch.manual_seed(0)
x, w = torch.full((8, 64), 0.5), torch.full((64, 64), 0.25)
casts = []
for call in range(2):  # the first call measures the GEMM against the block kernel, the second reuses the choice
    # The op itself (not entskip.skip_add, which casts first) under autocast: float32 reaches the kernel.
    with torch.profiler.profile() as prof, torch.autocast("cpu", dtype=torch.bfloat16):
        torch.ops.entskip.dense_skip_add(x, w, alpha, None)
    casts.append(sum(e.name == "aten::_to_copy" for e in prof.events()))
entskip.skip_add(x.bfloat16(), w.bfloat16())  # the bfloat16 measurement
print("rng_untouched", torch.equal(torch.randn(3), expected))
print("casts", *casts)
"""


@pytest.mark.skipif(not entskip.backends.native_available(), reason="entskip._C did not load")
def test_cpu_dense_kernel_choice_leaves_the_user_rng_and_autocast_alone():
    """The one-time measurements behind the dense path's choice (in a fresh process, where they run)
    use constant operands, so the user's seed stream is unchanged, and run below autocast, so the
    float32 products are not cast to bfloat16: the first call casts no more than the second."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FIRST_DENSE_CALLS], capture_output=True, text=True, check=True).stdout
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["rng_untouched"] == "True"
    first, second = map(int, lines["casts"].split())
    assert first == second, f"the first call cast {first - second} more tensors: autocast reached the measurement"


def test_cpu_dense_kernel_mode_is_checked(monkeypatch, cpu_backend):
    monkeypatch.setenv("ENTSKIP_CPU_DENSE_KERNEL", "fast")
    x, w = torch.randn(4, 64).bfloat16(), torch.randn(64, 64).bfloat16()
    with pytest.raises(RuntimeError, match="ENTSKIP_CPU_DENSE_KERNEL must be 'gemm', 'blocks' or empty"):
        entskip.skip_add(x, w)


@pytest.mark.parametrize("kind", NATIVE_KINDS)
def test_gradcheck_float64(kind, cpu_backend):
    mapping = make_mapping(kind, 16, 4, seed=1, out_dim=24)
    mat = stored_tensor(mapping).detach().clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    branch = torch.randn(5, mapping.out_features, generator=gen, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)

    def f(x, mat, alpha, branch):
        if isinstance(mapping, mappings.DenseMapping):
            return entskip.skip_add(x, mat, branch, alpha)
        return entskip.bsr_skip.bsr_skip_add(x, mat, *mapping.layout.tensors(), branch, alpha)

    assert torch.autograd.gradcheck(f, (x, mat, alpha, branch))


def _bsr_args(dtype=torch.float64, n=6, requires_grad=True):
    m = make_mapping("bsr_rect", 32, 8, seed=2, out_dim=48).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 32, generator=gen, dtype=dtype, requires_grad=requires_grad)
    v = m.blocks.detach().clone().requires_grad_(requires_grad)
    a = torch.tensor(0.9, dtype=dtype, requires_grad=requires_grad)
    r = torch.randn(n, 48, generator=gen, dtype=dtype, requires_grad=requires_grad)
    return x, v, m.layout.tensors(), a, r


def _dense_args(dtype=torch.float64, n=6, requires_grad=True):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 32, generator=gen, dtype=dtype, requires_grad=requires_grad)
    w = torch.randn(48, 32, generator=gen, dtype=dtype, requires_grad=requires_grad)
    a = torch.tensor(0.9, dtype=dtype, requires_grad=requires_grad)
    r = torch.randn(n, 48, generator=gen, dtype=dtype, requires_grad=requires_grad)
    return x, w, a, r


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_branch", [True, False])
def test_opcheck_forward_ops(dtype, with_branch):
    x, v, layout, a, r = _bsr_args(dtype)
    torch.library.opcheck(torch.ops.entskip.bsr_skip_add.default, (x, v, *layout, a, r if with_branch else None))
    x, w, a, r = _dense_args(dtype)
    torch.library.opcheck(torch.ops.entskip.dense_skip_add.default, (x, w, a, r if with_branch else None))


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, False], [False, False, True]])
def test_opcheck_backward_ops(mask):
    x, v, layout, a, r = _bsr_args(requires_grad=False)
    torch.library.opcheck(torch.ops.entskip.bsr_skip_add_backward.default, (r, x, v, *layout, a, mask))
    x, w, a, r = _dense_args(requires_grad=False)
    torch.library.opcheck(torch.ops.entskip.dense_skip_add_backward.default, (r, x, w, a, mask))


def test_backward_mask_leaves_unrequested_grads_undefined():
    x, v, layout, a, r = _bsr_args(requires_grad=False)
    dx, dv, da = torch.ops.entskip.bsr_skip_add_backward(r, x, v, *layout, a, [False, True, False])
    assert dx is None and da is None and dv.shape == v.shape


@pytest.mark.parametrize("kind", ["sparse", "orthogonal"])
def test_empty_batch(kind, cpu_backend):
    mapping = make_mapping(kind, 32, 8)
    values = stored_tensor(mapping).requires_grad_(True)
    x = torch.randn(0, 5, 32, dtype=torch.float64, requires_grad=True)
    branch = torch.randn(0, 5, 32, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    y = entskip.skip_add(x, mapping, branch, alpha)
    assert y.shape == (0, 5, 32)
    dx, dv, da, db = torch.autograd.grad(y.sum(), [x, values, alpha, branch])
    assert dx.shape == x.shape and db.shape == branch.shape
    assert torch.equal(dv, torch.zeros_like(values)) and da.item() == 0.0


@pytest.mark.parametrize("kind", ["sparse", "orthogonal", "identity", "permutation"])
def test_non_contiguous_inputs(kind, poisoned, cpu_backend):
    mapping = make_mapping(kind, 32, 8)
    m = mapping_dense = mapping.matrix().double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(32, 20, generator=gen, dtype=torch.float64).t()  # transposed view
    branch = torch.randn(20, 64, generator=gen, dtype=torch.float64)[:, ::2]  # strided slice
    assert not x.is_contiguous() and not branch.is_contiguous()
    assert_close(entskip.skip_add(x, mapping, branch, 0.3), reference.skip_add(x, m, branch, 0.3), torch.float64, "y")
    expanded = torch.randn(1, 32, generator=gen, dtype=torch.float64).expand(6, 32)  # stride 0
    assert_close(entskip.skip_add(expanded, mapping, None, 0.3), reference.skip_add(expanded, mapping_dense, None, 0.3), torch.float64, "y")


def test_sparse_bsr_tensor_mapping(cpu_backend):
    mapping = make_mapping("bsr_rect", 32, 8, seed=5, out_dim=48)
    bsr = mapping.layout.to_sparse_bsr(mapping.blocks)
    x = torch.randn(9, 32, dtype=torch.float64)
    assert_close(entskip.skip_add(x, bsr, None, 0.5), reference.skip_add(x, mapping.matrix(), None, 0.5), torch.float64, "y")


def test_deterministic_forward_backward(cpu_backend):
    mapping = make_mapping("sparse", 256, 32).float()
    values = stored_tensor(mapping).requires_grad_(True)
    x = torch.randn(1000, 256, requires_grad=True)
    alpha = torch.tensor(0.8, requires_grad=True)

    def run():
        y = entskip.skip_add(x, mapping, None, alpha)
        return (y, *torch.autograd.grad(y, [x, values, alpha], torch.ones_like(y)))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_tolerances_are_per_dtype():
    assert RTOL[torch.float64] <= 1e-10 and RTOL[torch.float32] <= 1e-5 and RTOL[torch.bfloat16] <= 1e-2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block", [8, 32])
def test_many_row_tiles(block, dtype, poisoned, cpu_backend):
    """Enough rows (4105) that every kernel crosses several row tiles, chunks and threads."""
    _check_against_reference(make_mapping("bsr_rect", 256, block, seed=7, out_dim=128), dtype, (5, 821), True)


@pytest.mark.parametrize("with_branch", [True, False], ids=["branch", "nobranch"])
@pytest.mark.parametrize("lead", [(1,), (11,), (13,), (5, 821)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "dtype, dim, kind, block",
    [(torch.float64, 32, "block_orthogonal", 16), (torch.float32, 64, "sparse", 16), (torch.float32, 64, "bsr_rect", 32),
     (torch.bfloat16, 64, "block_orthogonal", 16), (torch.bfloat16, 128, "sparse", 16)],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_narrow_rows_read_in_place(dtype, dim, kind, block, lead, with_branch, monkeypatch, poisoned, cpu_backend):
    """Rows of at most 256 bytes with few blocks, which the block-row kernel reads in place
    instead of packing: one row, fewer and more rows than a micro-tile (12 float32 rows at
    block 16), and rows across several tiles that end on a partial micro-tile. bfloat16
    rows are read in place by the AVX512-BF16 kernel (AMX off; in builds without it they
    are widened and packed, and the case checks that path)."""
    monkeypatch.setenv("ENTSKIP_CPU_AMX", "0")
    out_dim = 2 * dim if kind in RECT else dim
    _check_against_reference(make_mapping(kind, dim, block, seed=5, out_dim=out_dim), dtype, lead, with_branch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_narrow_rows_read_in_place_into_streamed_outputs(dtype, poisoned, cpu_backend):
    """Narrow rows read in place whose outputs (y and dx: 20011 x 64, 5 or 10 MiB) are large
    enough to be streamed, ending on a partial micro-tile."""
    _check_against_reference(make_mapping("sparse", 64, 16, seed=8), dtype, (20011,), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_narrow_rows_read_in_place_at_an_odd_offset(dtype, monkeypatch, poisoned, cpu_backend):
    """Narrow rows read in place from views one element into their storage (bfloat16 pairs
    then straddle 4-byte words): the same bits as from fresh copies, forward and every
    gradient, and y and dx against the float64 reference."""
    monkeypatch.setenv("ENTSKIP_CPU_AMX", "0")
    mapping = make_mapping("block_orthogonal", 64, 16, seed=2).to(dtype)
    values = stored_tensor(mapping).requires_grad_(True)
    gen = torch.Generator().manual_seed(3)
    x, r, g = (torch.randn(37 * 64 + 1, generator=gen, dtype=torch.float64).to(dtype)[1:].view(37, 64) for _ in range(3))
    assert x.storage_offset() == 1 and x.is_contiguous()

    def run(x, r):
        xk = x.detach().requires_grad_(True)
        y = entskip.skip_add(xk, mapping, r, 0.7)
        return (y, *torch.autograd.grad(y, [xk, values], g))

    offset, fresh = run(x, r), run(x.clone(), r.clone())
    for name, a, b in zip(("y", "dx", "dvalues"), offset, fresh):
        assert torch.equal(a, b), name
    M = mapping_matrix(mapping).double()
    assert_close(offset[0], 0.7 * x.double() @ M.T + r.double(), dtype, "y")
    assert_close(offset[1], 0.7 * g.double() @ M, dtype, "dx")


@pytest.mark.parametrize("path", ["widened", "avx512_bf16", "amx"])
@pytest.mark.parametrize(
    "kind, block, dim",
    [(k, b, 128) for k in ("sparse", "bsr_rect") for b in (16, 32, 64)] + [("sparse", 16, 144), ("orthogonal", 32, 128)],
)
def test_cpu_bfloat16_paths_match_reference(path, kind, block, dim, monkeypatch, poisoned, cpu_backend):
    """bfloat16 runs the widened float32 kernels; in builds for AVX512-BF16 CPUs
    (entskip._C.avx512_bf16), dot products over bfloat16 pairs (forward/dx where the input
    width is a multiple of 32, else widened: dim 144; dV always; the dense mapping through the
    block kernel); on CPUs with AMX-BF16 (entskip._C.amx), the forward and dx on AMX tiles
    (any input width). Each, chosen by ENTSKIP_CPU_AMX and ENTSKIP_CPU_AVX512_BF16, against the
    float64 reference, on rows that cross several tiles and end on a partial AMX unit."""
    import entskip._C

    if path == "amx" and not entskip._C.amx:
        pytest.skip("this CPU has no AMX-BF16 tiles")
    monkeypatch.setenv("ENTSKIP_CPU_AMX", "1" if path == "amx" else "0")
    monkeypatch.setenv("ENTSKIP_CPU_AVX512_BF16", "0" if path == "widened" else "1")
    monkeypatch.setenv("ENTSKIP_CPU_DENSE_KERNEL", "blocks")
    out_dim = dim + 64 if kind in RECT else dim
    _check_against_reference(make_mapping(kind, dim, block, seed=11, out_dim=out_dim), torch.bfloat16, (7, 331), True)


def test_cpu_avx512_bf16_switch_is_checked(monkeypatch, cpu_backend):
    import entskip._C

    monkeypatch.setenv("ENTSKIP_CPU_AVX512_BF16", "yes")
    monkeypatch.setenv("ENTSKIP_CPU_AMX", "0")  # the AMX path does not read the switch
    x = torch.randn(4, 64).bfloat16()
    mapping = make_mapping("sparse", 64, 32, seed=1).bfloat16()
    if not entskip._C.avx512_bf16:
        pytest.skip("this build has no AVX512-BF16 paths: the switch is not read")
    with pytest.raises(RuntimeError, match="ENTSKIP_CPU_AVX512_BF16 must be '0', '1' or empty"):
        entskip.skip_add(x, mapping)


def test_cpu_amx_switch_is_checked(monkeypatch, cpu_backend):
    monkeypatch.setenv("ENTSKIP_CPU_AMX", "yes")
    x = torch.randn(4, 64).bfloat16()
    mapping = make_mapping("sparse", 64, 32, seed=1).bfloat16()
    with pytest.raises(RuntimeError, match="ENTSKIP_CPU_AMX must be '0', '1' or empty"):
        entskip.skip_add(x, mapping)


@pytest.mark.parametrize("amx", ["0", "1"])
@pytest.mark.parametrize("block", [16, 32, 64])
def test_cpu_bfloat16_products_do_not_depend_on_the_thread_count(amx, block, monkeypatch, cpu_backend):
    """Each output element sums its blocks in a fixed order on whichever path runs: the
    bfloat16 forward and dx on 1 and 2 threads, bitwise, over rows that end on a partial unit."""
    monkeypatch.setenv("ENTSKIP_CPU_AMX", amx)
    mapping = make_mapping("sparse", 256, block, seed=3).bfloat16()
    values = stored_tensor(mapping).requires_grad_(True)
    x = torch.randn(1037, 256).bfloat16().requires_grad_(True)
    r = torch.randn(1037, 256).bfloat16()

    def run():
        y = entskip.skip_add(x, mapping, r, 0.7)
        return (y, *torch.autograd.grad(y, [x, values], torch.randn(1037, 256, generator=torch.Generator().manual_seed(5)).bfloat16()))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.skipif(not entskip.backends.native_available(), reason="entskip._C did not load")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="compares with /proc/cpuinfo")
def test_cpu_kernels_use_amx_where_the_cpu_has_it():
    """The AMX paths are compiled for every x86-64 build and taken where the CPU has AMX-BF16
    (and Linux grants the tile state, as it does from 5.16 on)."""
    import entskip._C

    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    assert entskip._C.amx == int("amx_bf16" in flags and "amx_tile" in flags)


@pytest.mark.skipif(not entskip.backends.native_available(), reason="entskip._C did not load")
@pytest.mark.skipif(not sys.platform.startswith("linux") or "ENTSKIP_CPU_ARCH" in os.environ,
                    reason="compares with /proc/cpuinfo for a default (-march=native) build")
def test_cpu_kernels_use_avx512_bf16_where_the_build_cpu_has_it():
    """setup.py builds for the build machine (-march=native): on a CPU with AVX512-BF16 the
    bfloat16 kernels get their dot-product paths, elsewhere not."""
    import entskip._C

    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    assert entskip._C.avx512_bf16 == int("avx512_bf16" in flags)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpu_large_outputs_are_streamed_correctly(dtype, poisoned, cpu_backend):
    """Outputs of 4 MiB or more (y: 16411 x 256, dx: 16411 x 128) are written by non-temporal
    stores (block_row_product.h), smaller ones through the cache: the streamed path against
    the float64 reference, forward and every gradient, ending on a row that no micro-tile fills."""
    mapping = make_mapping("bsr_rect", 128, 32, seed=13, out_dim=256)
    _check_against_reference(mapping, dtype, (16411,), True)
