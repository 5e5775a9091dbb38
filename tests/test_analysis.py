"""entskip.analysis on inputs whose answer is known in closed form."""

import math

import pytest
import torch

import entskip
from entskip import analysis, mappings


def _haar(n, seed=0):
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.diagonal(r).sign()


# --- effective rank ---------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 32])
def test_effective_rank_of_identity_is_its_size(n):
    assert analysis.effective_rank(torch.eye(n)) == pytest.approx(n, rel=1e-12)


def test_effective_rank_of_equal_singular_values_is_their_count():
    # (N, D) = (40, 6) with orthonormal columns scaled by 2: six equal singular values.
    x = 2 * torch.linalg.qr(torch.randn(40, 6, dtype=torch.float64))[0]
    assert analysis.effective_rank(x) == pytest.approx(6, rel=1e-10)


def test_effective_rank_of_rank_one_is_one():
    x = torch.randn(50, 1, dtype=torch.float64) @ torch.randn(1, 12, dtype=torch.float64)
    assert analysis.effective_rank(x) == pytest.approx(1, abs=1e-6)


def test_effective_rank_of_a_known_spectrum():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    p = s / s.sum()
    expected = math.exp(-float((p * p.log()).sum()))
    # U diag(s) V^T with random orthogonal U, V has singular values s.
    x = _haar(4, 1) @ torch.diag(s) @ _haar(4, 2).T
    assert analysis.effective_rank(x) == pytest.approx(expected, rel=1e-10)
    assert analysis.effective_rank(torch.diag(s)) == pytest.approx(expected, rel=1e-12)
    assert analysis.effective_rank(torch.diag(s).float()) == pytest.approx(expected, rel=1e-6)


def test_effective_rank_ignores_scale_and_zero_singular_values():
    s = torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert analysis.effective_rank(torch.diag(s)) == pytest.approx(analysis.effective_rank(7 * torch.diag(s[:2])))


def test_effective_rank_centered_removes_the_mean_direction():
    x = torch.randn(200, 3, dtype=torch.float64) @ _haar(3)
    shifted = x + 100.0  # a huge common offset: the raw matrix is nearly rank 1
    assert analysis.effective_rank(shifted) < 1.1
    assert analysis.effective_rank(shifted, center=True) == pytest.approx(analysis.effective_rank(x, center=True))
    assert analysis.effective_rank(shifted, center=True) > 2.5


@pytest.mark.parametrize("bad", [torch.zeros(3, 4), torch.ones(5, 2)])
def test_effective_rank_of_a_zero_matrix_raises(bad):
    center = bool(bad.any())  # a constant matrix is zero once centred
    with pytest.raises(ValueError, match="zero matrix"):
        analysis.effective_rank(bad, center=center)


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(2, 3, 4), torch.ones(3, 3, dtype=torch.int64), [[1.0]]])
def test_effective_rank_rejects_non_matrices(bad):
    with pytest.raises(ValueError, match="2-D floating-point"):
        analysis.effective_rank(bad)


# --- Jacobian of a skip -------------------------------------------------------------


@pytest.mark.parametrize(
    "mapping",
    [
        mappings.orthogonal(24, seed=3),
        mappings.block_orthogonal(24, block=8, seed=4),
        mappings.permutation(24, seed=5),
        mappings.identity(24),
    ],
    ids=lambda m: m.kind,
)
def test_jacobian_norm_of_orthogonal_mappings_is_one(mapping):
    assert analysis.jacobian_norm(mapping) == pytest.approx(1.0, abs=1e-6)
    assert analysis.jacobian_norm(mapping, alpha=0.25) == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.5, -0.5])
def test_jacobian_norm_of_a_scaled_identity(alpha):
    assert analysis.jacobian_norm(mappings.identity(10), alpha=alpha) == pytest.approx(abs(alpha), rel=1e-12)
    assert analysis.jacobian_norm(3 * torch.eye(6), alpha=alpha) == pytest.approx(3 * abs(alpha), rel=1e-12)


def test_jacobian_norm_of_spectrally_normalised_mappings_is_one():
    sparse = mappings.sparse(32, density=0.5, block=4, seed=1, construction="random")
    assert analysis.jacobian_norm(sparse) == pytest.approx(1.0, abs=1e-6)
    structural = mappings.structural(32, rho=0.5, block=4, normalize="spectral")
    assert analysis.jacobian_norm(structural) == pytest.approx(1.0, abs=1e-6)


def test_jacobian_norm_of_default_mappings_is_their_spectral_norm():
    for mapping in (mappings.sparse(32, density=0.5, block=4, seed=1), mappings.structural(32, block=4)):
        assert analysis.jacobian_norm(mapping) == pytest.approx(mapping.properties()["spectral_norm"], rel=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_skip_jacobian_is_alpha_times_the_mapping(backend):
    if backend == "cpu" and not entskip.native_available():
        pytest.skip("native library not loaded")
    skip = entskip.EntangledSkip(16, "sparse", alpha=0.7, density=0.5, block=4, seed=2)
    with entskip.use_backend(backend):
        jac = analysis.skip_jacobian(skip)
    assert jac.dtype == torch.float64 and jac.shape == (16, 16)
    torch.testing.assert_close(jac, 0.7 * skip.mapping.matrix().double(), rtol=1e-6, atol=1e-7)
    assert analysis.jacobian_norm(skip) == pytest.approx(0.7 * skip.mapping.properties()["spectral_norm"], rel=1e-6)


def test_skip_jacobian_of_a_rectangular_matrix():
    m = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(analysis.skip_jacobian(m, alpha=2.0), 2 * m)
    assert analysis.jacobian_norm(m) == pytest.approx(float(torch.linalg.svdvals(m)[0]))


def test_skip_jacobian_argument_errors():
    with pytest.raises(ValueError, match="alpha is taken from the EntangledSkip"):
        analysis.skip_jacobian(entskip.EntangledSkip(4), alpha=0.5)
    with pytest.raises(TypeError, match="EntangledSkip, an entskip Mapping or a 2-D tensor"):
        analysis.skip_jacobian(torch.ones(4))


# --- eigenvalue spectrum ------------------------------------------------------------


def test_eigenvalues_of_a_permutation_lie_on_the_unit_circle():
    perm = mappings.permutation(30, seed=7)
    eig = analysis.eigenvalue_spectrum(perm)
    assert eig.dtype == torch.complex128 and eig.shape == (30,)
    torch.testing.assert_close(eig.abs(), torch.ones(30, dtype=torch.float64))
    # Their product is the determinant: the permutation's sign.
    sign = float(torch.linalg.det(perm.matrix().double()))
    assert abs(sign) == pytest.approx(1.0)
    torch.testing.assert_close(eig.prod(), torch.tensor(sign, dtype=torch.complex128))


def test_eigenvalues_of_orthogonal_and_scaled_identity():
    eig = analysis.eigenvalue_spectrum(mappings.orthogonal(20, seed=1))
    torch.testing.assert_close(eig.abs(), torch.ones(20, dtype=torch.float64), atol=1e-6, rtol=0)
    eig = analysis.eigenvalue_spectrum(mappings.identity(8), alpha=0.6)
    torch.testing.assert_close(eig, torch.full((8,), 0.6, dtype=torch.complex128))


def test_eigenvalues_come_sorted_by_modulus():
    eig = analysis.eigenvalue_spectrum(torch.diag(torch.tensor([0.5, -3.0, 2.0])))
    torch.testing.assert_close(eig.real, torch.tensor([-3.0, 2.0, 0.5], dtype=torch.float64))


def test_eigenvalues_need_a_square_mapping():
    with pytest.raises(ValueError, match="square"):
        analysis.eigenvalue_spectrum(torch.ones(3, 4))


# --- kNN and linear probe -----------------------------------------------------------


def _clusters(n_per_class=40, classes=4, dim=16, seed=0, spread=0.1):
    """Well-separated Gaussian clusters around random directions: (x_train, y_train, x_test, y_test)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(2 * n_per_class)
    x = centers[y] + spread * torch.randn(len(y), dim, generator=g)
    order = torch.randperm(len(y), generator=g)
    x, y = x[order], y[order]
    half = len(y) // 2
    return x[:half], y[:half], x[half:], y[half:]


def test_knn_on_separable_clusters_is_perfect():
    assert analysis.knn_accuracy(*_clusters()) == 1.0
    assert analysis.knn_accuracy(*_clusters(seed=1), k=1) == 1.0


def test_linear_probe_on_separable_clusters_is_perfect():
    assert analysis.linear_probe(*_clusters()) == 1.0


def test_linear_probe_finds_a_linear_boundary_knn_cannot():
    # The label is the sign of one coordinate among many noisy ones: linear, but
    # cosine neighbours are dominated by the noise coordinates.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 30, generator=g)
    y = (x[:, 0] > 0).long()
    x[:, 0] *= 0.3
    probe = analysis.linear_probe(x[:300], y[:300], x[300:], y[300:])
    knn = analysis.knn_accuracy(x[:300], y[:300], x[300:], y[300:])
    assert probe > 0.95
    assert knn < 0.8


def test_knn_and_probe_on_random_labels_are_near_chance():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(400, 8, generator=g), torch.randint(0, 4, (400,), generator=g)
    assert analysis.knn_accuracy(x[:200], y[:200], x[200:], y[200:]) < 0.4
    assert analysis.linear_probe(x[:200], y[:200], x[200:], y[200:]) < 0.4


def test_readout_argument_errors():
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match="k must be in"):
        analysis.knn_accuracy(x, y, x, y, k=11)
    with pytest.raises(ValueError, match="train_labels"):
        analysis.knn_accuracy(x, y.float(), x, y)
    with pytest.raises(ValueError, match="test_labels"):
        analysis.linear_probe(x, y, x, y[:5])
    with pytest.raises(ValueError, match="differ in width"):
        analysis.linear_probe(x, y, torch.randn(10, 4), y)
