"""Robustness: NaN/Inf propagation, determinism, and 64-bit indexing on large GPU shapes.

- NaN and +-Inf placed in ``x`` and/or ``branch`` reach exactly the outputs (and gradients)
  that an explicit float64 product-and-sum reference says they reach: same NaN mask, same
  +Inf and -Inf masks, finite values within tolerance. A BSR mapping has sparse semantics: only
  stored blocks take part (a structural zero contributes nothing, like ``torch.sparse``), while a
  stored zero entry still turns Inf into NaN (``0 * Inf``), as in the reference.
- With ``torch.use_deterministic_algorithms(True)`` two runs of forward + backward are
  bit-identical on every CPU backend, for dense and BSR mappings, float32 and bfloat16, at a
  size that splits the work across threads; the BSR kernel claims thread-count independence,
  which is checked too.
- On a CUDA GPU, ``N * D > 2**31`` bfloat16 elements: a sample of output rows (the last ones
  included, whose offsets do not fit in 32 bits) matches the reference on those rows.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import entskip
from entskip import backends, mappings

from conftest import RTOL, make_mapping, stored_tensor


def _backends_for(device: str) -> list[str]:
    names = []
    for name in backends.BACKENDS:
        try:
            with backends.use_backend(name):
                backends.resolve(torch.device(device))
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        names.append(name)
    return names


CPU_BACKENDS = _backends_for("cpu")


def test_cpu_backends_are_all_tested():
    assert {"auto", "reference", "cpu"} <= set(CPU_BACKENDS), CPU_BACKENDS


# ---------------------------------------------------------------------------------------------
# NaN / Inf propagation
# ---------------------------------------------------------------------------------------------

KINDS = ["dense_rect", "orthogonal", "bsr_rect", "sparse", "block_orthogonal", "identity", "permutation"]
FUSED_KINDS = {"dense_rect", "orthogonal", "bsr_rect", "sparse", "block_orthogonal"}


def _explicit(mapping, stored64, x, branch, alpha, grad):
    """float64 ``y``, ``dx``, ``dM`` (of the stored tensor) and ``dalpha`` as explicit products and sums.

    No BLAS: every product is formed and summed, so 0 * Inf = NaN and Inf - Inf = NaN exactly
    where IEEE arithmetic puts them. BSR: only the stored blocks are summed; identity and
    permutation are a gather (the reference's ``x[..., index]``), with no products at all.
    """
    n = x.shape[0]
    if isinstance(mapping, mappings.BlockSparseMapping):
        b = mapping.block
        rows = torch.repeat_interleave(torch.arange(mapping.crow_indices.numel() - 1), mapping.crow_indices.diff())
        col = mapping.col_indices
        xb = x.reshape(n, -1, b)[:, col]  # (n, nnzb, b)
        gb = grad.reshape(n, -1, b)[:, rows]  # (n, nnzb, b)
        prod = (xb[:, :, None, :] * stored64[None]).sum(-1)  # (n, nnzb, b): x_col @ V^T
        y0 = torch.zeros(n, mapping.out_features // b, b, dtype=torch.float64).index_add(1, rows, prod).reshape(n, -1)
        dxp = (gb[:, :, :, None] * stored64[None]).sum(-2)  # (n, nnzb, b): g_row @ V
        dx = torch.zeros(n, mapping.in_features // b, b, dtype=torch.float64).index_add(1, col, dxp).reshape(n, -1)
        dm = alpha * (gb[:, :, :, None] * xb[:, :, None, :]).sum(0)  # (nnzb, b, b)
        dx = alpha * dx
    elif isinstance(mapping, (mappings.IdentityMapping, mappings.PermutationMapping)):
        # structured: y_i = x_index[i] (a gather), no products with the zeros of the matrix
        index = mapping.index if isinstance(mapping, mappings.PermutationMapping) else torch.arange(x.shape[1])
        y0 = x[:, index]
        dx = torch.zeros_like(x).index_add(1, index, alpha * grad)
        dm = None
    else:
        m = stored64
        y0 = (x[:, None, :] * m[None]).sum(-1)
        dx = alpha * (grad[:, :, None] * m[None]).sum(1)
        dm = alpha * (grad[:, :, None] * x[:, None, :]).sum(0) if stored64 is not None else None
    y = alpha * y0 + (branch if branch is not None else 0.0)
    dalpha = (grad * y0).sum()
    return y, dx, dm, dalpha


def _same_specials(what, actual, expected):
    a = actual.detach().double()
    for name, f in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = f(a), f(expected)
        assert torch.equal(got, want), (
            f"{what}: {name} at {int(got.sum())} places, the reference has {int(want.sum())}; "
            f"first difference at {tuple((got != want).nonzero()[0].tolist())}"
        )


def _finite_close(what, actual, expected, magnitude, rtol):
    a = actual.detach().double()
    finite = torch.isfinite(expected)
    if not bool(finite.any()):
        return
    top = max(float(magnitude[finite].max()), 1.0)
    err = (a - expected).abs()[finite]
    tol = rtol * (magnitude[finite] + 1e-3 * top)
    assert bool((err <= tol).all()), f"{what}: finite values off by up to {float(err.max()):.3g}"


def _inject(t: torch.Tensor, gen, count: int):
    """Put NaN, +Inf and -Inf at random places of ``t`` (in place), and a +Inf/-Inf pair in row 0."""
    flat = t.view(-1)
    specials = torch.tensor([float("nan"), float("inf"), float("-inf")], dtype=t.dtype)
    where = torch.randint(flat.numel(), (count,), generator=gen)
    flat[where] = specials[torch.randint(3, (count,), generator=gen)]
    t[0, 0], t[0, -1] = float("inf"), float("-inf")  # Inf - Inf somewhere for the dense kinds


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("where", ["x", "branch", "both"])
@pytest.mark.parametrize("kind", KINDS)
def test_nan_and_inf_propagate_like_the_reference(kind, where, dtype, backend):
    gen = torch.Generator().manual_seed(10 * KINDS.index(kind) + ("x", "branch", "both").index(where))
    mapping = make_mapping(kind, 64, 8, seed=1, out_dim=96).to(dtype)
    d_in, d_out = mapping.in_features, mapping.out_features
    x = torch.randn(40, d_in, generator=gen, dtype=torch.float64).to(dtype)
    branch = torch.randn(40, d_out, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(40, d_out, generator=gen, dtype=torch.float64).to(dtype)
    if where in ("x", "both"):
        _inject(x, gen, 12)
    if where in ("branch", "both"):
        _inject(branch, gen, 12)
    alpha = torch.tensor(-0.7, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

    stored = stored_tensor(mapping)
    xl = x.clone().requires_grad_(True)
    bl = branch.clone().requires_grad_(True)
    al = alpha.clone().requires_grad_(True)
    leaves = [xl, bl, al] + ([stored.requires_grad_(True)] if stored is not None else [])
    with entskip.use_backend(backend):
        y = entskip.skip_add(xl, mapping, bl, al)
        grads = torch.autograd.grad(y, leaves, grad)
    dx, dbranch, dalpha = grads[:3]
    dm = grads[3] if stored is not None else None

    s64 = None if stored is None else stored.detach().double()
    x64, b64, g64, a64 = x.double(), branch.double(), grad.double(), alpha.double()
    y_ref, dx_ref, dm_ref, da_ref = _explicit(mapping, s64, x64, b64, a64, g64)
    y_mag, dx_mag, dm_mag, da_mag = _explicit(
        mapping, None if s64 is None else s64.abs(), x64.abs(), b64.abs(), a64.abs(), g64.abs()
    )
    # the test is not vacuous: specials do reach the output, and not everywhere
    assert bool((~torch.isfinite(y_ref)).any()) and bool(torch.isfinite(y_ref).any())

    # tolerances as in test_fuzz.py: unfused bfloat16 paths (the reference's dense path, identity and
    # permutation on every backend) round up to four times
    rtol = RTOL[dtype]
    bsr = isinstance(mapping, mappings.BlockSparseMapping)
    if dtype == torch.bfloat16 and ((backend == "reference" and not bsr) or kind not in FUSED_KINDS):
        rtol *= 2
    checks = [("y", y, y_ref, y_mag), ("dx", dx, dx_ref, dx_mag), ("dalpha", dalpha, da_ref, da_mag)]
    if dm is not None:
        checks.append(("dM", dm, dm_ref, dm_mag))
    for name, got, want, mag in checks:
        _same_specials(f"{backend} {name}", got, want)
        _finite_close(f"{backend} {name}", got, want, mag, rtol)
    assert torch.equal(dbranch, grad), "dbranch must be the incoming gradient"
    if where == "branch":  # a NaN in the branch reaches only y (and nothing else)
        assert bool(torch.isfinite(dx).all()) and bool(torch.isfinite(dalpha).all())


@pytest.mark.parametrize("kind, backend", [(k, b) for k in KINDS for b in CPU_BACKENDS])
def test_alpha_zero_does_not_mask_nan_and_inf(kind, backend):
    mapping = make_mapping(kind, 32, 8, seed=2, out_dim=48)
    x = torch.randn(6, mapping.in_features, dtype=torch.float64)
    x[1, 3], x[2, 5], x[4, 0] = float("nan"), float("inf"), float("-inf")
    branch = torch.randn(6, mapping.out_features, dtype=torch.float64)
    with entskip.use_backend(backend):
        y = entskip.skip_add(x, mapping, branch, 0.0)
    stored = stored_tensor(mapping)
    zero = torch.tensor(0.0, dtype=torch.float64)
    y_ref, *_ = _explicit(mapping, None if stored is None else stored.double(), x, branch, zero, torch.zeros_like(branch))
    assert bool(torch.isnan(y_ref).any())  # 0 * NaN and 0 * Inf are NaN
    _same_specials(f"{backend} y", y, y_ref)
    finite = torch.isfinite(y_ref)
    assert torch.equal(y.double()[finite], y_ref[finite])  # alpha = 0: the branch, exactly


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------

N_DET, D_DET = 4096, 256


@pytest.fixture(scope="module")
def det_mappings():
    return {
        "dense": mappings.orthogonal(D_DET, seed=3),
        "dense_rect": mappings.DenseMapping(torch.randn(192, D_DET, generator=torch.Generator().manual_seed(4))),
        "bsr": mappings.sparse(D_DET, density=0.25, block=32, seed=5),
        "bsr_rect": make_mapping("bsr_rect", D_DET, 16, seed=6, out_dim=384).float(),
    }


def _run_once(mapping, x0, b0, g, alpha0):
    x = x0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True)
    a = alpha0.clone().requires_grad_(True)
    stored = stored_tensor(mapping)
    stored.grad = None
    stored.requires_grad_(True)
    y = entskip.skip_add(x, mapping, b, a)
    grads = torch.autograd.grad(y, [x, stored, a, b], g)
    return (y, *grads)


def _inputs(mapping, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N_DET, mapping.in_features, generator=gen).to(dtype)
    b = torch.randn(N_DET, mapping.out_features, generator=gen).to(dtype)
    g = torch.randn(N_DET, mapping.out_features, generator=gen).to(dtype)
    return x, b, g, torch.tensor(0.8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["dense", "dense_rect", "bsr", "bsr_rect"])
def test_deterministic_mode_gives_bit_identical_runs(kind, dtype, backend, det_mappings, poisoned):
    assert torch.are_deterministic_algorithms_enabled()
    mapping = copy.deepcopy(det_mappings[kind]).to(dtype)
    x, b, g, alpha = _inputs(mapping, dtype)
    with entskip.use_backend(backend):
        first = _run_once(mapping, x, b, g, alpha)
        second = _run_once(mapping, x, b, g, alpha)
    for name, u, v in zip(("y", "dx", "dM", "dalpha", "dbranch"), first, second):
        assert not bool(u.isnan().any()), f"{name} has NaN (an element left unwritten)"
        assert torch.equal(u, v), f"{backend} {kind} {dtype}: {name} differs between two runs"


@pytest.mark.skipif(not entskip.backends.native_available(), reason="entskip._C did not load")
def test_cpu_kernels_are_built_with_openmp():
    """at::parallel_for is a header template: an extension compiled without -fopenmp runs every
    CPU kernel on one thread, silently, whatever torch.get_num_threads() says."""
    import entskip._C

    assert entskip._C.openmp == int(torch.backends.openmp.is_available() and sys.platform.startswith("linux"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["bsr", "bsr_rect"])
def test_bsr_kernel_is_independent_of_the_thread_count(kind, dtype, det_mappings, cpu_backend):
    """bsr_skip_add.cpp: 'dS is reduced over N in a fixed order per block, so results are deterministic
    for any thread count' -- forward and every gradient, 1, 2 and 3 threads."""
    mapping = copy.deepcopy(det_mappings[kind]).to(dtype)
    x, b, g, alpha = _inputs(mapping, dtype, seed=1)
    previous = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = _run_once(mapping, x, b, g, alpha)
    finally:
        torch.set_num_threads(previous)
    for threads in (2, 3):
        for name, u, v in zip(("y", "dx", "dM", "dalpha", "dbranch"), results[1], results[threads]):
            assert torch.equal(u, v), f"{name} with {threads} threads differs from 1 thread"


# ---------------------------------------------------------------------------------------------
# Large shapes (GPU): 64-bit indexing
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["sparse", "dense", "identity"])
def test_more_than_2_31_elements_on_cuda(kind):
    d = 256
    n = 2**31 // d + 4099  # N * D > 2**31 by a margin, N not a multiple of any tile
    assert n * d > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * 2**30:
        pytest.skip(f"needs about 48 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    dev = torch.device("cuda")
    if kind == "sparse":
        mapping = mappings.sparse(d, density=0.25, block=32, seed=7, device=dev, dtype=torch.bfloat16)
    elif kind == "dense":
        mapping = mappings.orthogonal(d, seed=7, device=dev, dtype=torch.bfloat16)
    else:
        mapping = mappings.identity(d)
    m64 = mapping.matrix().to(dev, torch.float64)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, d, device=dev, dtype=torch.bfloat16, generator=gen)
    branch = torch.randn(n, d, device=dev, dtype=torch.bfloat16, generator=gen)
    rows = torch.cat(
        [
            torch.tensor([0, 1, 2**31 // d - 1, 2**31 // d, 2**31 // d + 1, n - 2, n - 1], device=dev),
            torch.randint(n, (4096,), device=dev, generator=gen),
        ]
    )
    alpha = 0.75
    for backend in _backends_for("cuda"):
        with entskip.use_backend(backend):
            y = entskip.skip_add(x, mapping, branch, alpha)
        assert y.shape == (n, d) and y.dtype == torch.bfloat16
        expected = alpha * (x[rows].double() @ m64.mT) + branch[rows].double()
        magnitude = alpha * (x[rows].double().abs() @ m64.abs().mT) + branch[rows].double().abs()
        err = (y[rows].double() - expected).abs()
        # unfused bfloat16 paths (the reference backend in this version) get the slack of test_fuzz.py
        bad = err > 3 * RTOL[torch.bfloat16] * (magnitude + 1e-3)
        assert not bool(bad.any()), f"{backend}: rows {rows[bad.any(1)][:8].tolist()} are wrong"
        del y
        torch.cuda.empty_cache()
