"""Property-based fuzzing of ``entskip.skip_add`` against an independent float64 reference.

Hypothesis draws a mapping (dense random rectangular, dense tensor, orthogonal, random BSR
layouts with empty rows or no blocks at all, a ``torch.sparse_bsr_tensor``, ``sparse``,
``structural``, ``block_orthogonal``, identity, permutation), a block size, ``D_in``/``D_out``,
leading dims of rank 1..4 (zero-size ones included), the feature dim, non-contiguous views of
``x`` and ``branch`` (permuted, stepped, expanded, offset), the dtype, the mapping's stored
dtype, ``alpha`` (float or 0-d / 1-element tensor, negative and zero included) and which inputs
require grad. Every backend that runs CPU tensors is compared, forward and every gradient,
with the same maths evaluated here in float64 on upcasts of the same rounded inputs.

Tolerance: an element passes when ``|actual - expected| <= rtol * (magnitude + 1e-3 * max(magnitude))``
where ``magnitude`` is the same computation on the absolute values of every input (for a
multilinear function that is the sum of the magnitudes of the terms that make the element: the
condition of a sum; for ``dalpha`` it is the conftest ``scale``), and ``rtol`` is conftest's
``RTOL`` of the coarser of the result's dtype and ``x``'s dtype (times the factor of ``_slack``
for unfused bfloat16/float16 paths; measured over 1500 reduced-precision examples, the fused
kernels' worst element is 0.6 * RTOL). Outputs are poisoned (deterministic mode fills fresh
tensors with NaN), so an element that a kernel never writes fails.

CI runs ``ENTSKIP_FUZZ_EXAMPLES`` (default 500) seeded examples; set it to 10000 for a long campaign,
or run a campaign in chunks: ``ENTSKIP_FUZZ_SEED=<n>`` draws another seeded set of examples per ``n``.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, seed, settings
from hypothesis import strategies as st

import entskip
from entskip import backends, mappings

from conftest import RTOL

EXAMPLES = int(os.environ.get("ENTSKIP_FUZZ_EXAMPLES", "500"))
SEED = os.environ.get("ENTSKIP_FUZZ_SEED")  # None: hypothesis's derandomized examples

KINDS = (
    "dense",  # DenseMapping, random rectangular
    "dense_tensor",  # a plain (possibly transposed) tensor as the mapping
    "orthogonal",
    "bsr_random",  # BlockSparseMapping on a random (rectangular) layout
    "bsr_tensor",  # a torch.sparse_bsr_tensor as the mapping
    "sparse",
    "structural",
    "block_orthogonal",
    "identity",
    "permutation",
)
SQUARE = {"orthogonal", "sparse", "structural", "block_orthogonal", "identity", "permutation"}
NO_GRAD = {"bsr_tensor", "identity", "permutation"}  # nothing learnable to differentiate
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
VIEWS = ("contiguous", "permuted", "step", "expand", "offset")
BLOCKS = (1, 2, 4, 8, 16, 32)
MAX_D = 128


def _cpu_backends() -> tuple[str, ...]:
    """Every backend name that runs CPU tensors in this build."""
    names = []
    for name in backends.BACKENDS:
        try:
            with backends.use_backend(name):
                backends.resolve(torch.device("cpu"))
        except (NotImplementedError, RuntimeError, ValueError):
            continue
        names.append(name)
    return tuple(names)


CPU_BACKENDS = _cpu_backends()


def test_fuzzed_backends_are_the_cpu_backends():
    assert entskip.native_available(), f"entskip._C did not load: {entskip.backends.NATIVE_ERROR}"
    assert {"auto", "reference", "cpu"} <= set(CPU_BACKENDS), CPU_BACKENDS


@contextlib.contextmanager
def poisoned():
    """conftest's ``poisoned`` fixture as a context manager (hypothesis and function fixtures clash)."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(4).isnan().all(), "poisoning is not active"
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


# ---------------------------------------------------------------------------------------------
# Drawing a case
# ---------------------------------------------------------------------------------------------


@st.composite
def cases(draw) -> dict:
    kind = draw(st.sampled_from(KINDS))
    block = draw(st.sampled_from(BLOCKS))
    k_in = draw(st.integers(1, MAX_D // block))
    k_out = k_in if kind in SQUARE else draw(st.integers(1, MAX_D // block))
    size = draw(st.integers(0, 9))  # 0-5: small, any rank; 6-8: up to 300 rows; 9: 1500-4500 rows
    if size <= 5:
        lead = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))  # rank 1..4, zero-size dims
    elif size <= 8:
        lead = draw(st.lists(st.integers(0, 300), min_size=1, max_size=1))
    else:  # crosses the kernels' row tiles and thread chunks
        lead = draw(st.lists(st.integers(1500, 4500), min_size=1, max_size=1))
    rank = len(lead) + 1
    alpha_kind = draw(st.sampled_from(("float", "tensor32", "tensor64", "tensor32_1elem")))
    case = dict(
        kind=kind,
        block=block,
        d_in=k_in * block,
        d_out=k_out * block,
        lead=lead,
        feature_dim=draw(st.one_of(st.just(-1), st.integers(0, rank - 1))),
        dtype=draw(st.sampled_from(DTYPES)),
        mapping_dtype=draw(st.sampled_from(("same", "float64", "float32"))),
        x_view=draw(st.sampled_from(VIEWS)),
        branch=draw(st.booleans()),
        branch_view=draw(st.sampled_from(VIEWS)),
        alpha=draw(st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5, -0.0]), st.floats(-3, 3, allow_nan=False))),
        alpha_kind=alpha_kind,
        alpha_grad=alpha_kind != "float" and draw(st.booleans()),
        x_grad=draw(st.booleans()),
        mapping_grad=kind not in NO_GRAD and draw(st.booleans()),
        branch_grad=draw(st.booleans()),
        density=draw(st.floats(0, 1)),
        empty_row=draw(st.booleans()),
        rho=draw(st.floats(-0.33, 0.33)),  # |rho| < 1/3: the banded Toeplitz is diagonally dominant
        bandwidth=draw(st.integers(0, 2 * block)),
        normalize=draw(st.sampled_from(("spectral", None))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return case


# ---------------------------------------------------------------------------------------------
# Building inputs
# ---------------------------------------------------------------------------------------------


def _randn(shape, gen, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _view(shape, kind, dtype, gen):
    """``(base, fn)``: a fresh ``base`` tensor and a view ``fn(base)`` of exactly ``shape``."""
    shape = tuple(shape)
    nd = len(shape)
    d = int(torch.randint(nd, (), generator=gen))
    if kind == "permuted" and nd >= 2:
        p = torch.randperm(nd, generator=gen).tolist()
        inverse = sorted(range(nd), key=p.__getitem__)
        return _randn([shape[i] for i in p], gen, dtype), lambda b: b.permute(inverse)
    if kind == "step":
        bshape = list(shape)
        bshape[d] *= 2
        index = (slice(None),) * d + (slice(None, None, 2),)
        return _randn(bshape, gen, dtype), lambda b: b[index]
    if kind == "expand":  # stride 0 along one dim
        bshape = list(shape)
        bshape[d] = 1
        return _randn(bshape, gen, dtype), lambda b: b.expand(shape)
    if kind == "offset":  # storage offset, non-contiguous unless d == 0
        bshape = list(shape)
        bshape[d] += 3
        return _randn(bshape, gen, dtype), lambda b: b.narrow(d, 2, shape[d])
    return _randn(shape, gen, dtype), lambda b: b


def _block_rows(crow):
    return torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())


def _bsr_dense(blocks, crow, col, shape):
    """Dense matrix of a BSR operand (differentiable in ``blocks``), written here, not taken from entskip."""
    b = blocks.shape[-1]
    grid = blocks.new_zeros(shape[0] // b, shape[1] // b, b, b)
    grid = grid.index_put((_block_rows(crow), col), blocks)
    return grid.permute(0, 2, 1, 3).reshape(shape)


def _mapping(case, gen):
    """``(arg, stored, to_dense)``.

    ``arg`` is passed to ``skip_add`` (a callable builds it from ``stored``); ``stored`` is
    the tensor that holds M (a leaf that may require grad) or None; ``to_dense(stored)``
    builds the dense ``(D_out, D_in)`` M, differentiably, from any version of ``stored``
    (float64 leaves for the reference).
    """
    kind, b, d_in, d_out = case["kind"], case["block"], case["d_in"], case["d_out"]
    mdtype = {"same": case["dtype"], "float64": torch.float64, "float32": torch.float32}[case["mapping_dtype"]]
    seed = case["seed"] % 10_000
    if kind == "identity":
        return mappings.identity(d_in), None, lambda _: torch.eye(d_in, dtype=torch.float64)
    if kind == "permutation":
        m = mappings.permutation(d_in, seed=seed)
        dense = torch.zeros(d_in, d_in, dtype=torch.float64)
        dense[torch.arange(d_in), m.index] = 1.0  # M[i, index[i]] = 1
        return m, None, lambda _: dense
    if kind == "dense":
        m = mappings.DenseMapping(_randn((d_out, d_in), gen, mdtype))
        return m, m.weight, lambda w: w
    if kind == "dense_tensor":
        base, fn = _view((d_out, d_in), "permuted" if bool(torch.rand((), generator=gen) < 0.5) else "contiguous", mdtype, gen)
        return fn, base, fn  # arg is built from the (leaf) base at run time
    if kind in ("bsr_random", "bsr_tensor"):
        mask = torch.rand(d_out // b, d_in // b, generator=gen) < case["density"]
        if case["empty_row"]:
            mask[int(torch.randint(mask.shape[0], (), generator=gen))] = False
        layout = entskip.BlockLayout.from_mask(mask, b)
        blocks = _randn((layout.nnzb, b, b), gen, mdtype)
        if kind == "bsr_tensor":
            crow, col = layout.crow_indices, layout.col_indices
            return layout.to_sparse_bsr(blocks), blocks, lambda v: _bsr_dense(v, crow, col, (d_out, d_in))
        m = mappings.BlockSparseMapping(layout, blocks)
    elif kind == "orthogonal":
        m = mappings.orthogonal(d_in, seed=seed, dtype=mdtype)
        return m, m.weight, lambda w: w
    elif kind == "sparse":
        density = max(case["density"], 1e-3)
        m = mappings.sparse(d_in, density=density, block=b, seed=seed, normalize=case["normalize"], dtype=mdtype)
    elif kind == "structural":
        m = mappings.structural(
            d_in, rho=case["rho"], bandwidth=case["bandwidth"], block=b, normalize=case["normalize"], dtype=mdtype
        )
    elif kind == "block_orthogonal":
        m = mappings.block_orthogonal(d_in, block=b, seed=seed, dtype=mdtype)
    else:
        raise AssertionError(kind)
    crow, col = m.crow_indices, m.col_indices
    shape = (m.out_features, m.in_features)
    # The library's dense view of M agrees with the one built here.
    assert torch.equal(m.matrix().double(), _bsr_dense(m.blocks.double(), crow, col, shape))
    return m, m.blocks, lambda v: _bsr_dense(v, crow, col, shape)


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------


def _close(what, actual, expected, magnitude, rtol):
    assert actual is not None, f"{what}: no gradient"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double()
    if a.numel() == 0:
        return
    top = max(float(magnitude.max()), 1.0)
    tol = rtol * (magnitude + 1e-3 * top)
    err = (a - expected).abs()
    bad = ~(err <= tol)  # NaN fails too
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements off (rtol {rtol:g}); first at flat index {i}: "
            f"actual {a.flatten()[i].item()!r}, expected {expected.flatten()[i].item()!r}, "
            f"magnitude {magnitude.flatten()[i].item()!r}; max |err| / magnitude "
            f"{float((err / (magnitude + 1e-3 * top)).nan_to_num(float('inf')).max()):.3g}"
        )


def _rtol(*dtypes):
    return max(RTOL[d] for d in dtypes)


def _slack(backend, dtype, mapping) -> float:
    """Tolerance factor for paths that compute in ``x``'s reduced dtype through unfused torch ops.

    The fused native kernels (``cpu``, and ``auto`` on CPU) and the reference BSR path accumulate
    in float32 and round once or twice: they get the plain conftest ``RTOL``. The reference dense
    path (``alpha * (x @ M^T) + branch``) and identity or permutation mappings on every backend
    (``alpha * x[..., index] + branch``) run several bfloat16/float16 ops in a row: alpha is cast
    to ``x``'s dtype and the product, the scale and the add each round, up to four roundings
    (4 * 2^-8 = 1.6e-2 in bfloat16): factor 2.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return 1.0
    if isinstance(mapping, (mappings.IdentityMapping, mappings.PermutationMapping)):
        return 2.0
    bsr = isinstance(mapping, mappings.BlockSparseMapping) or (
        isinstance(mapping, torch.Tensor) and mapping.layout == torch.sparse_bsr
    )
    return 2.0 if backend == "reference" and not bsr else 1.0


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=SEED is None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
@given(case=cases())
def test_skip_add_matches_float64_reference(case):
    note(repr(case))
    rows = math.prod(case["lead"])
    for label in (
        f"kind={case['kind']}",
        f"dtype={case['dtype']}",
        f"x_view={case['x_view']}",
        "rows=0" if rows == 0 else ("rows>=1500" if rows >= 1500 else "rows in 1..1499"),
        "branch" if case["branch"] else "no branch",
        "feature_dim not last" if case["feature_dim"] % (len(case["lead"]) + 1) != len(case["lead"]) else "feature_dim last",
        "some input requires grad"
        if case["x_grad"] or case["mapping_grad"] or case["alpha_grad"] or (case["branch"] and case["branch_grad"])
        else "no grad",
    ):
        event(label)
    dtype, fd, lead = case["dtype"], case["feature_dim"], case["lead"]
    gen = torch.Generator().manual_seed(case["seed"])
    arg, stored, to_dense = _mapping(case, gen)
    d_in, d_out = case["d_in"], case["d_out"]

    rank = len(lead) + 1
    fdp = fd % rank

    def with_features(n):
        shape = list(lead)
        shape.insert(fdp, n)
        return shape

    x_base0, x_fn = _view(with_features(d_in), case["x_view"], dtype, gen)
    b_base0, b_fn = _view(with_features(d_out), case["branch_view"], dtype, gen) if case["branch"] else (None, None)
    out_shape = with_features(d_out)
    grad_out = _randn(out_shape, gen, dtype)
    if case["alpha_kind"] == "float":
        alpha0 = case["alpha"]
        # skip_add turns a float into a float32 tensor (float64 for float64 x): the reference sees that value.
        alpha64 = torch.tensor(alpha0, dtype=torch.float64 if dtype == torch.float64 else torch.float32).double()
    else:
        adtype = torch.float64 if case["alpha_kind"] == "tensor64" else torch.float32
        alpha0 = torch.tensor(case["alpha"], dtype=adtype)
        if case["alpha_kind"] == "tensor32_1elem":
            alpha0 = alpha0.reshape(1)
        alpha64 = alpha0.double()

    snapshot = [t.clone() for t in (x_base0, b_base0, stored, alpha0) if isinstance(t, torch.Tensor)]

    # --- the float64 reference: the maths, on float64 upcasts of the rounded inputs ------------------
    def reference(absolute: bool):
        def f(t):  # a fresh float64 copy (never the caller's tensor), absolute values if asked
            t = t.detach().to(torch.float64, copy=True)
            return t.abs() if absolute else t

        xb = f(x_base0).requires_grad_(case["x_grad"])
        sb = None if stored is None else f(stored.to(dtype)).requires_grad_(case["mapping_grad"])
        al = f(alpha64).requires_grad_(case["alpha_grad"])
        bb = None if b_base0 is None else f(b_base0).requires_grad_(case["branch_grad"])
        m = to_dense(sb)  # a placement of |stored| when absolute (abs's gradient at 0 would be 0)
        xm = x_fn(xb).movedim(fdp, -1)
        y = al * (xm @ m.mT)
        if bb is not None:
            y = y + b_fn(bb).movedim(fdp, -1)
        y = y.movedim(-1, fdp)
        leaves = {"dx": xb, "dM": sb, "dalpha": al, "dbranch": bb}
        leaves = {k: v for k, v in leaves.items() if v is not None and v.requires_grad}
        grads = torch.autograd.grad(y, list(leaves.values()), f(grad_out)) if leaves else ()
        return y.detach(), dict(zip(leaves, grads))

    y_ref, g_ref = reference(False)
    y_mag, g_mag = reference(True)
    assert set(g_ref) == {
        k
        for k, need in (
            ("dx", case["x_grad"]),
            ("dM", case["mapping_grad"]),
            ("dalpha", case["alpha_grad"]),
            ("dbranch", case["branch"] and case["branch_grad"]),
        )
        if need
    }

    for backend in CPU_BACKENDS:
        note(f"backend {backend}")
        x_base = x_base0.clone().requires_grad_(case["x_grad"])
        b_base = None if b_base0 is None else b_base0.clone().requires_grad_(case["branch_grad"])
        alpha = alpha0 if not isinstance(alpha0, torch.Tensor) else alpha0.clone().requires_grad_(case["alpha_grad"])
        if stored is not None:
            stored.grad = None
            stored.requires_grad_(case["mapping_grad"])
        mapping = arg(stored) if callable(arg) and not isinstance(arg, torch.nn.Module) else arg
        x = x_fn(x_base)
        branch = None if b_base is None else b_fn(b_base)
        with poisoned(), entskip.use_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sparse BSR beta warning
            y = entskip.skip_add(x, mapping, branch, alpha, feature_dim=fd)
            wants_grad = any(
                (case["x_grad"], case["mapping_grad"], case["alpha_grad"], case["branch"] and case["branch_grad"])
            )
            assert y.requires_grad == wants_grad, f"{backend}: y.requires_grad is {y.requires_grad}"
            if wants_grad:
                y.backward(grad_out)
        assert y.dtype == dtype and list(y.shape) == out_shape and y.device.type == "cpu", backend
        if x.dim() == 4 and fdp == 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            assert y.is_contiguous(memory_format=torch.channels_last), f"{backend}: lost channels_last"
        slack = _slack(backend, dtype, mapping)
        _close(f"{backend} y", y, y_ref, y_mag, _rtol(dtype) * slack)

        got = {"dx": x_base, "dM": stored, "dalpha": alpha, "dbranch": b_base}
        for name, leaf in got.items():
            if not isinstance(leaf, torch.Tensor):
                continue
            if name not in g_ref:
                assert leaf.grad is None, f"{backend}: {name} was computed but the input does not require grad"
                continue
            assert leaf.grad is not None, f"{backend}: no {name}"
            assert leaf.grad.dtype == leaf.dtype, f"{backend}: {name} has dtype {leaf.grad.dtype}, not {leaf.dtype}"
            expected, mag = g_ref[name], g_mag[name]  # dM is with respect to the stored tensor (blocks)
            if name == "dalpha":
                expected, mag = expected.reshape(leaf.shape), mag.reshape(leaf.shape)
            _close(f"{backend} {name}", leaf.grad, expected, mag, _rtol(dtype, leaf.dtype) * slack)

        # inputs are never written
        now = [t for t in (x_base0, b_base0, stored, alpha0) if isinstance(t, torch.Tensor)]
        for before, after in zip(snapshot, now):
            assert torch.equal(before, after), f"{backend} modified an input in place"


if SEED is not None:
    test_skip_add_matches_float64_reference = seed(int(SEED))(test_skip_add_matches_float64_reference)


def test_reference_bsr_low_precision_accuracy():
    """Regression: the reference BSR path summed block products with index_add in bfloat16, so its
    error grew with the blocks per row (2.5e-2 of max |y| here, over the 1e-2 bfloat16 tolerance;
    on CUDA `auto` runs the reference). It now accumulates in float32 like the kernels."""
    m = mappings.sparse(1024, density=1.0, block=16, seed=0, normalize=None, dtype=torch.bfloat16)
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)).bfloat16()
    expected = x.double() @ m.matrix().double().mT
    with entskip.use_backend("cpu"):  # the control: an accurate kernel passes the same check
        cpu = entskip.skip_add(x, m)
    assert float((cpu.double() - expected).abs().max()) <= RTOL[torch.bfloat16] * float(expected.abs().max())
    with entskip.use_backend("reference"):
        y = entskip.skip_add(x, m)
    assert float((y.double() - expected).abs().max()) <= RTOL[torch.bfloat16] * float(expected.abs().max())


@pytest.mark.parametrize("which", ["y", "dx"])
def test_dense_cpu_kernel_rounds_alpha_once(which):
    alpha = 0.26643692478774333
    a32 = torch.tensor(alpha, dtype=torch.float32).double()  # skip_add's alpha: a float32 tensor
    x = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_(True)
    w = torch.ones(1, 1, dtype=torch.bfloat16)  # M = [[1]]: the exact result is alpha * x
    g = torch.randn(4096, 1, generator=torch.Generator().manual_seed(1)).bfloat16()
    with entskip.use_backend("cpu"):
        y = entskip.skip_add(x, w, None, alpha)
        (dx,) = torch.autograd.grad(y, x, g)
    got, exact = (y, x.double() * a32) if which == "y" else (dx, g.double() * a32)
    # one rounding to bfloat16 of the exact value: relative error at most 2^-8
    assert bool(((got.double() - exact).abs() <= 2.0**-8 * exact.abs() * (1 + 1e-6)).all())


def test_dense_cpu_kernel_with_branch_rounds_once():
    """The control for the test above: the branch path (addmm, alpha in float) meets the same criterion."""
    alpha = 0.26643692478774333
    a32 = torch.tensor(alpha, dtype=torch.float32).double()
    x = torch.randn(4096, 1, generator=torch.Generator().manual_seed(0)).bfloat16()
    with entskip.use_backend("cpu"):
        y = entskip.skip_add(x, torch.ones(1, 1, dtype=torch.bfloat16), torch.zeros(4096, 1, dtype=torch.bfloat16), alpha)
    exact = x.double() * a32
    assert bool(((y.double() - exact).abs() <= 2.0**-8 * exact.abs() * (1 + 1e-6)).all())
