"""Depth schedules (entskip.schedules, docs/design.md "Schedules")."""

import math
import random

import pytest

from entskip import schedules as S

LAYERS = [1, 2, 3, 6, 12, 24]
ALPHA_MINS = [0.0, 0.4, 0.6, 0.8, 0.99]


def test_constant():
    assert S.constant(4) == [1.0, 1.0, 1.0, 1.0]
    assert S.constant(3, 0.7) == [0.7, 0.7, 0.7]
    assert S.constant(1, 0) == [0.0]
    assert all(isinstance(v, float) for v in S.constant(2, 1))


@pytest.mark.parametrize("num_layers", LAYERS)
@pytest.mark.parametrize("alpha_min", ALPHA_MINS)
def test_decayed_per_layer(num_layers, alpha_min):
    alphas = S.decayed(num_layers, alpha_min)
    L = num_layers
    assert len(alphas) == L
    assert alphas[-1] == alpha_min
    assert alphas[0] == pytest.approx(1 - (1 - alpha_min) / L, abs=1e-15)
    # The paper's formula alpha_l = 1 - l (1 - alpha_min) / L, l = 1..L.
    for layer, a in enumerate(alphas, start=1):
        assert a == pytest.approx(1 - layer * (1 - alpha_min) / L, abs=1e-15)
    assert all(later < earlier for earlier, later in zip(alphas, alphas[1:]))
    assert all(0 <= a <= 1 for a in alphas)


@pytest.mark.parametrize("num_layers", LAYERS)
@pytest.mark.parametrize("alpha_min", ALPHA_MINS)
def test_decayed_per_sublayer(num_layers, alpha_min):
    alphas = S.decayed(num_layers, alpha_min, per_sublayer=True)
    assert len(alphas) == 2 * num_layers
    assert alphas[0] == 1.0
    assert alphas[-1] == pytest.approx(alpha_min, abs=1e-15)
    step = (1 - alpha_min) / (2 * num_layers - 1)
    for earlier, later in zip(alphas, alphas[1:]):
        assert earlier - later == pytest.approx(step, abs=1e-14)
        assert later < earlier
    # Same as the official MAE code: 1 - linspace(0, 1, 2L) * (1 - alpha_min).
    n = 2 * num_layers
    assert alphas == pytest.approx([1 - (i / (n - 1)) * (1 - alpha_min) for i in range(n)], abs=1e-15)


@pytest.mark.parametrize("per_sublayer", [False, True])
def test_decayed_alpha_min_one_is_constant(per_sublayer):
    alphas = S.decayed(5, 1.0, per_sublayer=per_sublayer)
    assert alphas == [1.0] * (10 if per_sublayer else 5)


def test_decayed_examples():
    assert S.decayed(4, 0.6) == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert S.decayed(2, 0.4, per_sublayer=True) == pytest.approx([1.0, 0.8, 0.6, 0.4])
    assert S.decayed(1, 0.3) == [0.3]


def test_effective_alpha_is_product():
    rng = random.Random(0)
    for _ in range(20):
        alphas = [rng.uniform(0.3, 1.0) for _ in range(rng.randint(1, 30))]
        expected = 1.0
        for a in alphas:
            expected *= a
        assert S.effective_alpha(alphas) == pytest.approx(expected, rel=1e-12)
    assert S.effective_alpha([]) == 1.0
    assert S.effective_alpha([0.5, 0.0, 0.9]) == 0.0
    assert S.effective_alpha(S.decayed(4, 0.6)) == pytest.approx(0.9 * 0.8 * 0.7 * 0.6, rel=1e-12)
    assert S.effective_alpha(S.constant(3, 0.5)) == pytest.approx(0.125, rel=1e-15)


@pytest.mark.parametrize("per_sublayer", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2, 6, 12, 24, 48])
def test_alpha_min_for_inverts(num_layers, per_sublayer):
    rng = random.Random(num_layers * 2 + per_sublayer)
    targets = [1e-3, 2e-3, 5e-3, 9.99e-3] + [10 ** rng.uniform(-3, -2) for _ in range(3)]
    previous = -1.0
    for target in sorted(targets):
        alpha_min = S.alpha_min_for(num_layers, target, per_sublayer=per_sublayer)
        assert 0 <= alpha_min <= 1
        got = S.effective_alpha(S.decayed(num_layers, alpha_min, per_sublayer))
        assert abs(got - target) <= 1e-9 * target
        assert alpha_min > previous  # a larger target needs a larger alpha_min
        previous = alpha_min


def test_alpha_min_for_deeper_needs_larger_alpha_min():
    # Deeper nets need a larger alpha_min for the same alpha_eff.
    values = [S.alpha_min_for(L, 5e-3) for L in (4, 8, 16, 32)]
    assert values == sorted(values) and len(set(values)) == 4


def test_alpha_min_for_edges():
    assert S.alpha_min_for(1, 0.25) == pytest.approx(0.25, abs=1e-11)
    assert S.alpha_min_for(7, 1.0) == pytest.approx(1.0, abs=1e-11)


BAD_CALLS = [
    ("constant_layers_0", lambda: S.constant(0), "num_layers"),
    ("constant_layers_negative", lambda: S.constant(-2, 0.5), "num_layers"),
    ("constant_layers_float", lambda: S.constant(2.0, 0.5), "num_layers"),
    ("constant_layers_bool", lambda: S.constant(True, 0.5), "num_layers"),
    ("constant_value_nan", lambda: S.constant(3, math.nan), "value"),
    ("constant_value_inf", lambda: S.constant(3, math.inf), "value"),
    ("decayed_layers_0", lambda: S.decayed(0, 0.5), "num_layers"),
    ("decayed_layers_0_sublayer", lambda: S.decayed(0, 0.5, per_sublayer=True), "num_layers"),
    ("decayed_alpha_min_negative", lambda: S.decayed(4, -0.1), "alpha_min"),
    ("decayed_alpha_min_above_1", lambda: S.decayed(4, 1.1), "alpha_min"),
    ("decayed_alpha_min_above_1_sublayer", lambda: S.decayed(4, 1.5, per_sublayer=True), "alpha_min"),
    ("decayed_alpha_min_nan", lambda: S.decayed(4, math.nan), "alpha_min"),
    ("decayed_alpha_min_inf", lambda: S.decayed(4, -math.inf), "alpha_min"),
    ("decayed_alpha_min_string", lambda: S.decayed(4, "0.5"), "alpha_min"),
    ("alpha_min_for_eff_0", lambda: S.alpha_min_for(4, 0.0), "alpha_eff"),
    ("alpha_min_for_eff_negative", lambda: S.alpha_min_for(4, -1e-3), "alpha_eff"),
    ("alpha_min_for_eff_above_1", lambda: S.alpha_min_for(4, 1.5), "alpha_eff"),
    ("alpha_min_for_eff_nan", lambda: S.alpha_min_for(4, math.nan), "alpha_eff"),
    ("alpha_min_for_layers_0", lambda: S.alpha_min_for(0, 5e-3), "num_layers"),
]


@pytest.mark.parametrize("call,match", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("tol", [0.0, -1.0, math.nan])
def test_alpha_min_for_rejects_non_positive_tol(monkeypatch, tol):
    calls = {"n": 0}
    real = S.effective_alpha

    def counting(alphas):
        calls["n"] += 1
        assert calls["n"] < 5000, "alpha_min_for does not terminate"  # bisection needs < 1100 steps
        return real(alphas)

    monkeypatch.setattr(S, "effective_alpha", counting)
    with pytest.raises(ValueError, match="tol must be a positive number"):
        S.alpha_min_for(4, 5e-3, tol=tol)
