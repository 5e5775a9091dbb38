"""Mapping constructors (entskip.mappings): the claims of properties(), structure, seeds, learnable kinds."""

import math
import warnings

import pytest
import torch

import entskip
from entskip import mappings as M
from entskip import reference


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _dense64(mapping):
    return mapping.matrix().detach().to(torch.float64)


# ---------------------------------------------------------------------------------------------
# Orthogonal kinds
# ---------------------------------------------------------------------------------------------

ORTHOGONAL_KINDS = [
    ("orthogonal", lambda dtype, seed: M.orthogonal(64, seed=seed, dtype=dtype)),
    ("orthogonal_128", lambda dtype, seed: M.orthogonal(128, seed=seed, dtype=dtype)),
    ("block_orthogonal_8", lambda dtype, seed: M.block_orthogonal(64, 8, seed=seed, dtype=dtype)),
    ("block_orthogonal_32", lambda dtype, seed: M.block_orthogonal(128, 32, seed=seed, dtype=dtype)),
    # permutation() takes no dtype: its matrix is exact in any dtype.
    ("permutation", lambda dtype, seed: M.permutation(64, seed=seed)),
]


@pytest.mark.parametrize("build", [k[1] for k in ORTHOGONAL_KINDS], ids=[k[0] for k in ORTHOGONAL_KINDS])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)], ids=["f32", "f64"])
def test_orthogonal_kinds_properties(build, dtype, tol):
    mapping = build(dtype, 5)
    props = mapping.properties()
    assert props["orthogonality_error"] < tol
    assert abs(props["eig_abs_min"] - 1) < max(tol, 1e-6) * 10
    assert abs(props["eig_abs_max"] - 1) < max(tol, 1e-6) * 10
    assert abs(props["spectral_norm"] - 1) < tol
    assert abs(props["min_singular_value"] - 1) < tol
    # Cross-check the reported numbers against the matrix itself.
    m = _dense64(mapping)
    assert props["orthogonality_error"] == pytest.approx(
        float((m.T @ m - torch.eye(m.shape[0], dtype=torch.float64)).abs().max()), abs=1e-12
    )
    assert torch.allclose(m @ m.T, torch.eye(m.shape[0], dtype=torch.float64), atol=10 * tol)


def test_orthogonal_eigenvalues_within_1e_6():
    for mapping in (M.orthogonal(96, seed=1), M.block_orthogonal(96, 16, seed=1), M.permutation(96, seed=1)):
        p = mapping.properties()
        assert abs(p["eig_abs_min"] - 1) < 1e-6 and abs(p["eig_abs_max"] - 1) < 1e-6, mapping


def test_block_orthogonal_structure():
    mapping = M.block_orthogonal(64, 16, seed=3)
    layout = mapping.layout
    assert layout.nnzb == 4
    assert layout.col_indices.tolist() == [0, 1, 2, 3]
    assert mapping.density == pytest.approx(16 / 64)
    m = _dense64(mapping)
    mask = torch.block_diag(*[torch.ones(16, 16)] * 4).bool()
    assert bool((m[~mask] == 0).all())
    for blk in mapping.blocks.detach().double():
        assert torch.allclose(blk.T @ blk, torch.eye(16, dtype=torch.float64), atol=1e-6)


def test_permutation_structure():
    mapping = M.permutation(64, seed=4)
    m = mapping.matrix()
    assert bool(((m == 0) | (m == 1)).all())
    assert torch.equal(m.sum(0), torch.ones(64)) and torch.equal(m.sum(1), torch.ones(64))
    x = torch.randn(3, 64, generator=_gen(0))
    assert torch.equal(entskip.skip_add(x, mapping), x @ m.T)
    assert not torch.equal(mapping.index, torch.arange(64))


def test_identity_properties():
    p = M.identity(32).properties()
    assert p["orthogonality_error"] == 0 and p["spectral_norm"] == pytest.approx(1)
    x = torch.randn(4, 32, generator=_gen(1))
    r = torch.randn(4, 32, generator=_gen(2))
    assert torch.allclose(entskip.skip_add(x, M.identity(32), r, 0.3), 0.3 * x + r)


# ---------------------------------------------------------------------------------------------
# Haar orthogonal: row-major, and the op uses M (not M^T)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [32, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_haar_weight_is_row_major_and_op_matches_reference(dim, dtype):
    mapping = M.orthogonal(dim, seed=7, dtype=dtype)
    w = mapping.weight
    assert w.is_contiguous()
    assert w.stride() == (dim, 1)
    assert w.dtype == dtype
    # Not symmetric, so computing with W^T instead of W would be caught.
    assert (w - w.T).abs().max() > 0.1
    g = _gen(8)
    x = torch.randn(10, dim, generator=g, dtype=dtype)
    r = torch.randn(10, dim, generator=g, dtype=dtype)
    y = entskip.skip_add(x, mapping, r, alpha=0.6)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, 0.6 * (x @ w.T) + r, atol=tol, rtol=tol)
    assert (y - (0.6 * (x @ w) + r)).abs().max() > 0.1


def test_haar_signs_fixed_by_diag_r():
    # Q * sign(diag(R)) makes the QR factor of the result have a positive diagonal R.
    w = M.orthogonal(48, seed=2, dtype=torch.float64).weight
    q, r = torch.linalg.qr(w)
    # w = q r with r = diag(+-1) up to rounding; Householder QR of an orthogonal matrix gives |r_ii| = 1.
    assert torch.allclose(r.abs(), torch.eye(48, dtype=torch.float64), atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Sparse
# ---------------------------------------------------------------------------------------------

SPARSE_CASES = [(64, 0.5, 8), (64, 0.25, 8), (128, 0.125, 16), (96, 0.3, 8), (64, 1.0, 16), (64, 0.01, 8), (256, 0.25, 32)]


@pytest.mark.filterwarnings("ignore:.*one block per block row")  # two cases have k = 1 on purpose
@pytest.mark.parametrize("dim,density,block", SPARSE_CASES)
def test_sparse_properties(dim, density, block):
    n = dim // block
    k = min(n, max(1, round(density * n)))
    mapping = M.sparse(dim, density, block, seed=3, construction="random", dtype=torch.float64)
    props = mapping.properties()
    assert abs(props["spectral_norm"] - 1) < 1e-6
    assert abs(M.spectral_norm(mapping.matrix()) - 1) < 1e-10
    layout = mapping.layout
    assert torch.equal(layout.crow_indices.diff(), torch.full((n,), k))
    assert mapping.density == pytest.approx(k / n)
    assert props["density"] == pytest.approx(k / n)
    if k == round(density * n):
        assert mapping.density == pytest.approx(round(density * n) / n)
    # Every diagonal block is stored, and they all hold the same scaled identity.
    rows = reference.block_rows(layout.crow_indices)
    diag = rows == layout.col_indices
    assert int(diag.sum()) == n
    assert torch.equal(layout.col_indices[diag], torch.arange(n))
    dblocks = mapping.blocks[diag]
    scale = float(dblocks[0, 0, 0])
    assert scale > 0
    assert torch.allclose(dblocks, scale * torch.eye(block, dtype=torch.float64).expand(n, block, block), atol=1e-14)
    off = mapping.blocks[~diag]
    assert off.shape[0] == n * (k - 1)
    if off.numel():
        assert bool((off != 0).any())
        # Diagonal dominance of the construction: off-diagonal entries are much smaller than the diagonal.
        assert float(off.abs().max()) < scale


def test_sparse_float32_spectral_norm():
    p = M.sparse(128, 0.25, 16, seed=1, construction="random").properties()
    assert abs(p["spectral_norm"] - 1) < 1e-6


def test_sparse_unnormalized_has_identity_diagonal_and_offdiag_scale():
    dim, block, density = 256, 8, 0.5
    n = dim // block
    k = round(density * n)
    mapping = M.sparse(dim, density, block, seed=0, construction="random", normalize=None, dtype=torch.float64)
    layout = mapping.layout
    diag = reference.block_rows(layout.crow_indices) == layout.col_indices
    assert torch.equal(mapping.blocks[diag], torch.eye(block, dtype=torch.float64).expand(n, block, block))
    off = mapping.blocks[~diag]
    # Entries ~ N(0, 1/(k b)): the sample variance of n*(k-1)*b*b = 15872 draws is within ~10%.
    var = float(off.var())
    assert var == pytest.approx(1 / (k * block), rel=0.1)
    assert float(off.mean()) == pytest.approx(0, abs=0.01)
    # Normalized = unnormalized / its spectral norm.
    normed = M.sparse(dim, density, block, seed=0, construction="random", dtype=torch.float64)
    torch.testing.assert_close(normed.matrix(), mapping.matrix() / M.spectral_norm(mapping.matrix()), rtol=1e-12, atol=1e-14)


# Default (unipotent) sparse: the identity's eigenvalues, a Jacobian norm near 1, real mixing.
# (512, 1/8, 32) is the reference point; (16|32|64, 1/4, 2) the cnn experiment's widths,
# (64, 1/4, 8) the vit's; the rest other sizes and densities.
UNIPOTENT_CASES = [
    (512, 0.125, 32), (16, 0.25, 2), (32, 0.25, 2), (64, 0.25, 2), (64, 0.25, 8),
    (256, 0.25, 32), (128, 0.5, 16), (96, 0.3, 8), (256, 0.5, 8),
]


def _offdiag(mapping):
    layout = mapping.layout
    diag = reference.block_rows(layout.crow_indices) == layout.col_indices
    return diag, mapping.blocks.detach().double()


@pytest.mark.parametrize("dim,density,block", UNIPOTENT_CASES)
@pytest.mark.parametrize("seed", [0, 7, 123])
def test_default_sparse_keeps_the_identitys_spectrum(dim, density, block, seed):
    mapping = M.sparse(dim, density, block, seed=seed, dtype=torch.float64)
    p = mapping.properties()
    assert 0.8 <= p["eig_abs_min"] and p["eig_abs_max"] <= 1.25
    assert 1.0 - 1e-9 <= p["spectral_norm"] <= 1.25
    assert p["distance_from_identity"] == pytest.approx(0.15, rel=1e-9)
    m = mapping.matrix()
    n = dim // block
    # Unipotent: (M - I)^n = 0 exactly in exact arithmetic (strictly block-triangular in some order),
    # so every eigenvalue is 1 even where eigvals() of the defective matrix is inaccurate.
    nil = torch.linalg.matrix_power(m - torch.eye(dim, dtype=torch.float64), n)
    assert float(nil.abs().max()) < 1e-12
    assert p["eig_mean"] == pytest.approx(1.0, abs=1e-12)
    # Diagonal blocks are I; every off-diagonal block is the same multiple of an orthogonal block.
    diag, blocks = _offdiag(mapping)
    assert torch.equal(blocks[diag], torch.eye(block, dtype=torch.float64).expand(n, block, block))
    off = blocks[~diag]
    k = min(n, max(1, round(density * n)))
    assert off.shape[0] == (k - 1) * n - (k - 1) * k // 2  # sum over positions p = 0..n-1 of min(p, k - 1)
    scale2 = 0.15**2 * dim / (off.shape[0] * block)
    torch.testing.assert_close(off @ off.mT, scale2 * torch.eye(block, dtype=torch.float64).expand_as(off), atol=1e-12, rtol=0)
    assert p["density"] == pytest.approx((n + off.shape[0]) / n**2)


@pytest.mark.parametrize("strength", [0.0, 0.05, 0.1, 0.3])
def test_sparse_strength_is_the_distance_from_identity(strength):
    p = M.sparse(128, 0.25, 16, seed=4, strength=strength, dtype=torch.float64).properties()
    assert p["distance_from_identity"] == pytest.approx(strength, abs=1e-12)
    assert 0.8 <= p["eig_abs_min"] and p["eig_abs_max"] <= 1.25
    assert 1 - 1e-9 <= p["spectral_norm"] <= 1 + 1.6 * strength + 1e-9  # ||I + eps N|| <= 1 + eps ||N||
    if strength == 0:
        assert p["spectral_norm"] == pytest.approx(1.0, abs=1e-12)


def test_sparse_random_construction_is_the_old_contracting_one():
    """The construction before issue 17 (for old results): norm 1 but eigenvalues well inside the unit disk."""
    p = M.sparse(512, 0.125, 32, seed=0, construction="random", dtype=torch.float64).properties()
    assert p["spectral_norm"] == pytest.approx(1.0, abs=1e-9)
    assert p["eig_abs_max"] < 0.9 and p["eig_abs_mean"] < 0.7 and p["rms_gain"] < 0.7
    explicit = M.sparse(512, 0.125, 32, seed=0, construction="random", normalize="spectral", dtype=torch.float64)
    assert torch.equal(explicit.matrix(), M.sparse(512, 0.125, 32, seed=0, construction="random", dtype=torch.float64).matrix())
    spectral = M.sparse(512, 0.125, 32, seed=0, normalize="spectral", dtype=torch.float64).properties()
    assert spectral["spectral_norm"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("construction", ["unipotent", "random"])
def test_sparse_one_block_per_row_warns(construction):
    with pytest.warns(UserWarning, match="one block per block row"):
        mapping = M.sparse(256, 0.125, 32, construction=construction)  # 8 block rows, k = 1
    assert torch.equal(mapping.matrix(), torch.eye(256))
    with pytest.warns(UserWarning, match="one block per block row"):
        M.sparse(32, 1.0, 32)  # a single block row
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.sparse(256, 0.25, 32)


def test_sparse_checkpoints_load_across_constructions():
    old = M.sparse(64, 0.5, 8, seed=2, construction="random")
    new = M.sparse(64, 0.5, 8, seed=2)
    assert old.layout != new.layout
    new.load_state_dict(old.state_dict())
    assert torch.equal(new.matrix(), old.matrix())


# ---------------------------------------------------------------------------------------------
# Structural
# ---------------------------------------------------------------------------------------------


def _toeplitz(dim, rho, bandwidth):
    idx = torch.arange(dim)
    lag = (idx[:, None] - idx[None, :]).abs()
    c = torch.tensor(float(rho), dtype=torch.float64) ** lag
    return torch.where(lag <= bandwidth, c, torch.zeros((), dtype=torch.float64)), lag


STRUCTURAL_CASES = [(64, 0.5, None, 8), (64, 0.3, 5, 8), (128, 0.6, 12, 16), (64, -0.4, 3, 8), (64, 0.5, 0, 8), (96, 0.2, 40, 32)]


@pytest.mark.parametrize("dim,rho,bandwidth,block", STRUCTURAL_CASES)
def test_structural_spectral(dim, rho, bandwidth, block):
    mapping = M.structural(dim, rho, bandwidth, block, normalize="spectral", dtype=torch.float64)
    m = mapping.matrix()
    bw = block if bandwidth is None else bandwidth
    expected, lag = _toeplitz(dim, rho, bw)
    assert torch.equal(m, m.T)
    diag = torch.diagonal(m)
    assert torch.equal(diag, diag[0].expand_as(diag))
    eig = torch.linalg.eigvalsh(m)
    assert bool((eig > 0).all())
    assert abs(float(eig[-1]) - 1) < 1e-10
    p = mapping.properties()
    assert abs(p["spectral_norm"] - 1) < 1e-10
    assert bool((m[lag > bw] == 0).all())
    torch.testing.assert_close(m, expected / M.spectral_norm(expected), rtol=1e-12, atol=1e-15)
    assert float(diag[0]) == pytest.approx(1 / float(torch.linalg.eigvalsh(expected)[-1]), rel=1e-12)


@pytest.mark.parametrize("dim,rho,bandwidth,block", STRUCTURAL_CASES)
def test_structural_unnormalized_is_correlation(dim, rho, bandwidth, block):
    mapping = M.structural(dim, rho, bandwidth, block, normalize=None, dtype=torch.float64)
    m = mapping.matrix()
    bw = block if bandwidth is None else bandwidth
    expected, lag = _toeplitz(dim, rho, bw)
    assert torch.equal(torch.diagonal(m), torch.ones(dim, dtype=torch.float64))
    assert torch.equal(m, m.T)
    assert bool((m[lag > bw] == 0).all())
    torch.testing.assert_close(m, expected, rtol=1e-14, atol=0)
    assert bool((torch.linalg.eigvalsh(m) > 0).all())


@pytest.mark.parametrize("dim,rho,bandwidth,block", STRUCTURAL_CASES)
def test_structural_layout_is_block_band(dim, rho, bandwidth, block):
    mapping = M.structural(dim, rho, bandwidth, block, normalize="spectral")
    bw = block if bandwidth is None else bandwidth
    n = dim // block
    bi = torch.arange(n)
    # Block pair (i, j) intersects the band iff the closest entries are within bw.
    gap = ((bi[:, None] - bi[None, :]).abs() * block - (block - 1)).clamp_min(0)
    expected = entskip.BlockLayout.from_mask(gap <= bw, block)
    assert mapping.layout == expected
    assert mapping.density == pytest.approx(float((gap <= bw).float().mean()))
    # Every stored block holds a non-zero (no stored block lies wholly outside the band), unless rho == 0.
    assert bool((mapping.blocks.abs().amax(dim=(1, 2)) > 0).all())


@pytest.mark.parametrize("dim,block", [(512, 32), (64, 8), (16, 4), (32, 4), (64, 4), (96, 32)])
def test_default_structural_keeps_unit_diagonal_and_mean_eigenvalue(dim, block):
    mapping = M.structural(dim, block=block, dtype=torch.float64)
    p = mapping.properties()
    m = mapping.matrix()
    assert torch.equal(torch.diagonal(m), torch.ones(dim, dtype=torch.float64))
    assert abs(p["eig_mean"] - 1) < 0.1 and p["eig_mean"] == pytest.approx(1.0, abs=1e-12)
    eig = torch.linalg.eigvalsh(m)
    assert float(eig.sum() / dim) == pytest.approx(1.0, abs=1e-12)
    assert 0.8 <= float(eig[0]) and float(eig[-1]) <= 1.25
    assert p["spectral_norm"] == pytest.approx(float(eig[-1]), rel=1e-10)
    assert p["distance_from_identity"] >= 0.1


def test_structural_not_positive_definite_raises():
    dim, rho, bandwidth, block = 64, 0.95, 3, 8
    dense, _ = _toeplitz(dim, rho, bandwidth)
    assert float(torch.linalg.eigvalsh(dense)[0]) < -0.5  # really indefinite
    with pytest.raises(ValueError, match="positive definite"):
        M.structural(dim, rho, bandwidth, block)
    with pytest.raises(ValueError, match="positive definite"):
        M.structural(dim, rho, bandwidth, block, normalize=None)


def test_structural_is_deterministic():
    a = M.structural(64, 0.4, 6, 8)
    b = M.structural(64, 0.4, 6, 8)
    assert torch.equal(a.matrix(), b.matrix())
    assert not torch.equal(a.matrix(), M.structural(64, 0.41, 6, 8).matrix())


# ---------------------------------------------------------------------------------------------
# Every kind: the op agrees with the dense reference
# ---------------------------------------------------------------------------------------------

ALL_KINDS = [
    ("identity", lambda: M.identity(64)),
    ("orthogonal", lambda: M.orthogonal(64, seed=1)),
    ("block_orthogonal", lambda: M.block_orthogonal(64, 16, seed=1)),
    ("permutation", lambda: M.permutation(64, seed=1)),
    ("sparse", lambda: M.sparse(64, 0.25, 8, seed=1)),
    ("structural", lambda: M.structural(64, 0.5, 8, 16)),
]


@pytest.mark.parametrize("build", [k[1] for k in ALL_KINDS], ids=[k[0] for k in ALL_KINDS])
def test_op_matches_reference(build):
    mapping = build()
    g = _gen(21)
    x = torch.randn(7, 64, generator=g, dtype=torch.float64)
    r = torch.randn(7, 64, generator=g, dtype=torch.float64)
    m = _dense64(mapping)
    y = entskip.skip_add(x, mapping, r, alpha=0.8)
    torch.testing.assert_close(y, reference.skip_add(x, m, r, 0.8), rtol=1e-6, atol=1e-6)


PROPERTY_BUILDS = {
    "identity": lambda d, s: M.identity(d),
    "orthogonal": lambda d, s: M.orthogonal(d, seed=s),
    "block_orthogonal": lambda d, s: M.block_orthogonal(d, 8, seed=s),
    "permutation": lambda d, s: M.permutation(d, seed=s),
    "sparse": lambda d, s: M.sparse(d, 0.5, 8, seed=s),
    "sparse_random": lambda d, s: M.sparse(d, 0.5, 8, seed=s, construction="random"),
    "structural": lambda d, s: M.structural(d, block=8),
}


@pytest.mark.parametrize("kind", list(PROPERTY_BUILDS))
@pytest.mark.parametrize("dim,seed", [(32, 0), (64, 5), (128, 11)])
def test_properties_measure_what_they_name(kind, dim, seed):
    mapping = PROPERTY_BUILDS[kind](dim, seed)
    p = mapping.properties()
    m = _dense64(mapping)
    eye = torch.eye(dim, dtype=torch.float64)
    eig = torch.linalg.eigvals(m).abs()
    assert p["spectral_norm"] == pytest.approx(float(torch.linalg.matrix_norm(m, 2)), rel=1e-6)
    assert p["rms_gain"] == pytest.approx(float(torch.trace(m.T @ m) / dim) ** 0.5, rel=1e-6)
    assert p["eig_abs_min"] == pytest.approx(float(eig.min()), abs=1e-6)
    assert p["eig_abs_max"] == pytest.approx(float(eig.max()), abs=1e-6)
    assert p["eig_abs_mean"] == pytest.approx(float(eig.mean()), abs=1e-6)
    assert p["eig_mean"] == pytest.approx(float(torch.trace(m)) / dim, abs=1e-6)
    assert p["distance_from_identity"] == pytest.approx(float(((m - eye) ** 2).sum().sqrt()) / dim**0.5, abs=1e-6)
    assert p["density"] == pytest.approx(mapping.density)
    assert p["orthogonality_error"] == pytest.approx(float((m.T @ m - eye).abs().max()), abs=1e-6)
    if kind in ("identity", "orthogonal", "block_orthogonal", "permutation"):
        assert p["eig_abs_min"] == pytest.approx(1, abs=1e-5) and p["eig_abs_max"] == pytest.approx(1, abs=1e-5)
        assert p["rms_gain"] == pytest.approx(1, abs=1e-5) and p["spectral_norm"] == pytest.approx(1, abs=1e-5)
    if kind in ("sparse", "structural"):  # the defaults keep what the identity has, as far as their kind allows
        assert 0.8 <= p["eig_abs_min"] and p["eig_abs_max"] <= 1.25 and 1 - 1e-5 <= p["spectral_norm"] <= 1.25
        assert abs(p["eig_mean"] - 1) < 0.1 and p["distance_from_identity"] >= 0.1
    assert (kind == "identity") == (p["distance_from_identity"] == 0)


def test_properties_of_a_rectangular_mapping():
    p = M.DenseMapping(torch.ones(3, 5, dtype=torch.float64)).properties()
    assert p["spectral_norm"] == pytest.approx(15**0.5) and p["rms_gain"] == pytest.approx(3**0.5)
    assert "eig_abs_min" not in p and "distance_from_identity" not in p


# ---------------------------------------------------------------------------------------------
# Reproducibility
# ---------------------------------------------------------------------------------------------

SEEDED = [
    ("orthogonal", lambda s: M.orthogonal(64, seed=s)),
    ("block_orthogonal", lambda s: M.block_orthogonal(64, 8, seed=s)),
    ("permutation", lambda s: M.permutation(64, seed=s)),
    ("sparse", lambda s: M.sparse(64, 0.375, 8, seed=s)),
    ("make_sparse", lambda s: M.make("sparse", 64, density=0.5, block=16, seed=s)),
]


@pytest.mark.parametrize("build", [k[1] for k in SEEDED], ids=[k[0] for k in SEEDED])
def test_seed_reproducibility(build):
    torch.manual_seed(1)
    a = build(17)
    torch.manual_seed(2)  # the global RNG must not matter
    b = build(17)
    c = build(18)
    assert torch.equal(a.matrix(), b.matrix())
    assert not torch.equal(a.matrix(), c.matrix())
    if isinstance(a, M.BlockSparseMapping):
        assert a.layout == b.layout


def test_sparse_different_seeds_give_different_layouts():
    layouts = {tuple(M.sparse(128, 0.25, 8, seed=s).col_indices.tolist()) for s in range(4)}
    assert len(layouts) == 4


def test_make_matches_constructors():
    assert torch.equal(M.make("orthogonal", 32, seed=3).matrix(), M.orthogonal(32, seed=3).matrix())
    assert torch.equal(M.make("permutation", 32, seed=3).matrix(), M.permutation(32, seed=3).matrix())
    assert torch.equal(M.make("structural", 32, rho=0.3, block=8).matrix(), M.structural(32, 0.3, block=8).matrix())
    assert torch.equal(M.make("identity", 32).matrix(), torch.eye(32))
    kwargs = {"sparse": {"block": 8, "density": 0.25}, "structural": {"block": 8}, "block_orthogonal": {"block": 8}}
    kinds = {name: M.make(name, 64, **kwargs.get(name, {})).kind for name in M.MAPPINGS}
    assert kinds == {name: name for name in M.MAPPINGS}


# ---------------------------------------------------------------------------------------------
# Learnable orthogonal kinds
# ---------------------------------------------------------------------------------------------


def _train(mapping, steps=4, lr=0.2, seed=0):
    opt = torch.optim.SGD(mapping.parameters(), lr=lr)
    g = _gen(seed)
    for _ in range(steps):
        x = torch.randn(16, 64, generator=g)
        r = torch.randn(16, 64, generator=g)
        target = torch.randn(16, 64, generator=g)
        loss = (entskip.skip_add(x, mapping, r, alpha=0.7) - target).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_learnable_orthogonal_stays_orthogonal():
    frozen = M.orthogonal(64, seed=4)
    mapping = M.orthogonal(64, seed=4, learnable=True)
    assert len(list(mapping.parameters())) == 1
    torch.testing.assert_close(mapping.weight, frozen.weight, atol=1e-6, rtol=0)
    _train(mapping)
    w = mapping.weight.detach().double()
    assert float((w.T @ w - torch.eye(64, dtype=torch.float64)).abs().max()) < 1e-5
    assert mapping.properties()["orthogonality_error"] < 1e-5
    assert float((mapping.weight - frozen.weight).abs().max()) > 1e-3


def test_learnable_orthogonal_state_dict_round_trip():
    mapping = M.orthogonal(64, seed=4, learnable=True)
    _train(mapping, steps=2)
    fresh = M.orthogonal(64, seed=4, learnable=True)
    fresh.load_state_dict(mapping.state_dict())
    assert torch.equal(fresh.matrix(), mapping.matrix())


def test_learnable_block_orthogonal_stays_orthogonal():
    frozen = M.block_orthogonal(64, 8, seed=4)
    # Regression: registering the parametrization used to raise KeyError (a tensor named
    # 'values' clashed with ModuleDict.values); the tensor is now called 'blocks'.
    mapping = M.block_orthogonal(64, 8, seed=4, learnable=True)
    assert torch.nn.utils.parametrize.is_parametrized(mapping, "blocks")
    assert isinstance(mapping.parametrizations.blocks[0], M.BatchedCayley)
    torch.testing.assert_close(mapping.blocks, frozen.blocks, atol=1e-6, rtol=0)
    _train(mapping)
    assert mapping.properties()["orthogonality_error"] < 1e-5
    assert float((mapping.blocks - frozen.blocks).abs().max()) > 1e-3


def test_learnable_block_orthogonal_state_dict_round_trip():
    mapping = M.block_orthogonal(64, 8, seed=4, learnable=True)
    _train(mapping, steps=2)
    fresh = M.block_orthogonal(64, 8, seed=4, learnable=True)
    fresh.load_state_dict(mapping.state_dict())
    assert torch.equal(fresh.matrix(), mapping.matrix())
    assert not torch.equal(fresh.matrix(), M.block_orthogonal(64, 8, seed=4).matrix())


def test_batched_cayley_parametrization_keeps_blocks_orthogonal():
    # The parametrization itself, independent of how block_orthogonal registers it.
    base = M.block_orthogonal(64, 8, seed=2, dtype=torch.float64).blocks
    cayley = M.BatchedCayley(base)
    a = cayley.right_inverse(base)
    assert torch.equal(a, torch.zeros_like(base))
    assert torch.allclose(cayley(a), base, atol=1e-14)
    a = torch.randn(base.shape, generator=_gen(3), dtype=torch.float64)
    blocks = cayley(a)
    eye = torch.eye(8, dtype=torch.float64)
    assert torch.allclose(blocks.mT @ blocks, eye.expand_as(blocks), atol=1e-12)
    assert float((blocks - base).abs().max()) > 1e-2


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------

BAD_ARGS = [
    ("sparse_dim_not_divisible", lambda: M.sparse(60, 0.5, 8), "dim"),
    ("block_orthogonal_dim_not_divisible", lambda: M.block_orthogonal(60, 8), "dim"),
    ("structural_dim_not_divisible", lambda: M.structural(60, 0.5, block=8), "dim"),
    ("sparse_density_0", lambda: M.sparse(64, 0.0, 8), "density"),
    ("sparse_density_1.5", lambda: M.sparse(64, 1.5, 8), "density"),
    ("sparse_density_negative", lambda: M.sparse(64, -0.25, 8), "density"),
    ("sparse_density_nan", lambda: M.sparse(64, math.nan, 8), "density"),
    ("structural_rho_1", lambda: M.structural(64, 1.0, 4, 8), "rho"),
    ("structural_rho_above_1", lambda: M.structural(64, 1.5, 4, 8), "rho"),
    ("structural_rho_minus_1", lambda: M.structural(64, -1.0, 4, 8), "rho"),
    ("structural_rho_nan", lambda: M.structural(64, math.nan, 4, 8), "rho"),
    ("structural_bandwidth_negative", lambda: M.structural(64, 0.5, -1, 8), "bandwidth"),
    ("structural_bandwidth_float", lambda: M.structural(64, 0.5, 2.5, 8), "bandwidth"),
    ("make_unknown", lambda: M.make("householder", 64), "unknown mapping"),
    ("sparse_block_0", lambda: M.sparse(64, 0.5, 0), "block"),
    ("block_orthogonal_block_0", lambda: M.block_orthogonal(64, 0), "block"),
    ("structural_block_0", lambda: M.structural(64, 0.5, block=0), "block"),
    ("sparse_block_negative", lambda: M.sparse(64, 0.5, -8), "block"),
    ("block_orthogonal_block_float", lambda: M.block_orthogonal(64, 8.0), "block"),
    ("orthogonal_dim_0", lambda: M.orthogonal(0), "dim"),
    ("permutation_dim_negative", lambda: M.permutation(-4), "dim"),
    ("identity_dim_float", lambda: M.identity(64.0), "dim"),
    ("sparse_normalize_unknown", lambda: M.sparse(64, 0.5, 8, normalize="frobenius"), "normalize"),
    ("sparse_construction_unknown", lambda: M.sparse(64, 0.5, 8, construction="dense"), "construction"),
    ("sparse_strength_negative", lambda: M.sparse(64, 0.5, 8, strength=-0.1), "strength"),
    ("sparse_strength_nan", lambda: M.sparse(64, 0.5, 8, strength=float("nan")), "strength"),
    ("structural_normalize_unknown", lambda: M.structural(64, 0.5, block=8, normalize="max"), "normalize"),
]


@pytest.mark.parametrize("build,match", [c[1:] for c in BAD_ARGS], ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_mapping_classes_reject_bad_inputs():
    with pytest.raises(ValueError, match="index"):
        M.PermutationMapping(torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="weight"):
        M.DenseMapping(torch.ones(3))
    layout = entskip.BlockLayout(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), 4, (8, 8))
    with pytest.raises(ValueError, match="blocks"):
        M.BlockSparseMapping(layout, torch.zeros(3, 4, 4))
    with pytest.raises(TypeError, match="layout"):
        M.BlockSparseMapping("not a layout", torch.zeros(2, 4, 4))


# ---------------------------------------------------------------------------------------------
# dtype moves
# ---------------------------------------------------------------------------------------------

MOVABLE = [
    ("orthogonal", lambda: M.orthogonal(64, seed=1)),
    ("orthogonal_learnable", lambda: M.orthogonal(64, seed=1, learnable=True)),
    ("block_orthogonal", lambda: M.block_orthogonal(64, 8, seed=1)),
    ("permutation", lambda: M.permutation(64, seed=1)),
    ("sparse", lambda: M.sparse(64, 0.25, 8, seed=1)),
    ("sparse_learnable", lambda: M.sparse(64, 0.25, 8, seed=1, learnable=True)),
    ("structural", lambda: M.structural(64, 0.5, 8, 8)),
]


@pytest.mark.parametrize("build", [k[1] for k in MOVABLE], ids=[k[0] for k in MOVABLE])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_to_dtype_keeps_int64_indices(build, dtype):
    mapping = build()
    m32 = mapping.matrix().detach().clone()
    moved = mapping.to(dtype)
    float_tensors = 0
    for name, t in list(moved.named_buffers()) + list(moved.named_parameters()):
        if t.dtype.is_floating_point:
            assert t.dtype == dtype, name
            float_tensors += 1
        else:
            assert t.dtype == torch.int64, name
    if isinstance(moved, M.BlockSparseMapping):
        for t in moved.layout.tensors():
            assert t.dtype == torch.int64
        assert moved.blocks.dtype == dtype
    if isinstance(moved, M.PermutationMapping):
        assert moved.index.dtype == torch.int64
        assert float_tensors == 0
    else:
        assert float_tensors >= 1
        # torch's Cayley map (linalg.solve) has no float16/bfloat16 CPU kernel: skip evaluating it there.
        if dtype == torch.float64 or not torch.nn.utils.parametrize.is_parametrized(moved):
            assert moved.matrix().dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(moved.matrix().double(), m32.double(), atol=1e-6, rtol=0)
        x = torch.randn(3, 64, dtype=dtype, generator=_gen(0))
        torch.testing.assert_close(entskip.skip_add(x, moved, None, 0.5), 0.5 * x @ moved.matrix().double().T)


# ---------------------------------------------------------------------------------------------
# spectral_norm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(32, 32), (64, 64), (17, 40), (96, 33), (1, 8), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_norm_matches_matrix_norm(shape, dtype):
    m = torch.randn(shape, generator=_gen(shape[0] * 1000 + shape[1]), dtype=dtype)
    expected = float(torch.linalg.matrix_norm(m.double(), 2))
    got = M.spectral_norm(m)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-10)
    # A rank-one spike on top: one dominant direction is still measured right.
    u = torch.randn(shape[0], 1, generator=_gen(1), dtype=dtype)
    v = torch.randn(1, shape[1], generator=_gen(2), dtype=dtype)
    spiked = m + 10 * u @ v
    assert M.spectral_norm(spiked) == pytest.approx(float(torch.linalg.matrix_norm(spiked.double(), 2)), rel=1e-10)


def test_spectral_norm_special_cases():
    assert M.spectral_norm(torch.zeros(8, 5)) == 0.0
    assert M.spectral_norm(torch.eye(16)) == pytest.approx(1.0, rel=1e-12)
    d = torch.diag(torch.tensor([0.5, -4.0, 2.0], dtype=torch.float64))
    assert M.spectral_norm(d) == pytest.approx(4.0, rel=1e-12)
    w = torch.randn(20, 20, generator=_gen(1), requires_grad=True)
    assert M.spectral_norm(w) == pytest.approx(float(torch.linalg.matrix_norm(w.detach().double(), 2)), rel=1e-10)
