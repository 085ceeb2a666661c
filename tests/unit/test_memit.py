"""The MEMIT algebra against the paper's equations, on random matrices."""

import numpy as np
import pytest

from sleeptui import memit

D_IN, D_OUT = 48, 16


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _covariance(rng, n=400):
    k = rng.normal(size=(n, D_IN)) * rng.uniform(0.2, 2.0, size=D_IN)
    return k.T @ k / n


def test_woodbury_solve_equals_direct_solve(rng):
    c = _covariance(rng)
    keys = rng.normal(size=(D_IN, 5))
    residual = rng.normal(size=(D_OUT, 5))
    via_woodbury = residual @ memit.solve_update(
        keys, memit.inverse_covariance(c, ridge=0), lam=0.1
    )
    direct = memit.direct_update(keys, residual, c, lam=0.1)
    np.testing.assert_allclose(via_woodbury, direct, rtol=1e-8, atol=1e-10)


def test_shrinkage_moves_the_covariance_towards_its_mean_variance_and_keeps_its_trace(rng):
    c = _covariance(rng)
    mean_var = np.trace(c) / D_IN
    for shrink in (0.0, 0.5, 1.0):
        shrunk = (1 - shrink) * c + shrink * mean_var * np.eye(D_IN)
        np.testing.assert_allclose(np.trace(shrunk), np.trace(c))
        np.testing.assert_allclose(
            memit.inverse_covariance(c, shrink=shrink, ridge=0),
            np.linalg.inv(shrunk),
            rtol=1e-8,
            atol=1e-10,
        )


def test_shrinkage_lowers_an_edits_reach_into_directions_the_sample_underweights(rng):
    """Keys drawn with more variance in Ĉ's weak directions than Ĉ says (the case of real
    text against the model's own samples) see less of a shrunk edit per unit it achieves."""
    c = _covariance(rng)
    weak = np.linalg.eigh(c)[1][:, : D_IN // 4]  # Ĉ's weakest quarter of directions
    true_c = c + np.trace(c) / D_IN * (weak @ weak.T)
    key = rng.normal(size=D_IN)

    def reach(shrink):
        v = memit.inverse_covariance(c, shrink=shrink) @ key
        return v @ true_c @ v / (key @ v) ** 2

    assert reach(0.5) < 0.8 * reach(0.0)


def test_the_names_prior_lowers_an_edits_reach_into_what_other_names_share(rng):
    """Other names' keys share a direction with the fact's key (what the model reads at any
    name); with their second moment in the regulariser, the edit relies less on it."""
    c = _covariance(rng)
    shared = rng.normal(size=D_IN)
    key = shared + 0.5 * rng.normal(size=D_IN)
    others = shared + 0.5 * rng.normal(size=(300, D_IN))
    names = others.T @ others / len(others)

    def reach(weight):
        v = memit.inverse_covariance(c, shrink=0.5, priors=[(names, weight)]) @ key
        return v @ names @ v / (key @ v) ** 2

    np.testing.assert_array_equal(
        memit.inverse_covariance(c, shrink=0.5, priors=[(names, 0.0)]),
        memit.inverse_covariance(c, shrink=0.5),
    )
    assert reach(0.3) < 0.5 * reach(0.0)
    assert reach(1.0) < reach(0.3)


def test_constrained_edit_leaves_protected_keys_unchanged(rng):
    c_inv = memit.inverse_covariance(_covariance(rng))
    new = rng.normal(size=(D_IN, 2))
    protected = rng.normal(size=(D_IN, 6))
    keys = np.concatenate([new, protected], axis=1)
    residual = np.concatenate([rng.normal(size=(D_OUT, 2)), np.zeros((D_OUT, 6))], axis=1)
    delta_w = residual @ memit.solve_update(keys, c_inv, lam=1e-6)
    # The protected keys' outputs stay where they were, the new ones move as asked (eq. 5).
    assert np.abs(delta_w @ protected).max() < 1e-4 * np.abs(residual).max()
    np.testing.assert_allclose(delta_w @ new, residual[:, :2], rtol=1e-3, atol=1e-4)


def test_unconstrained_edit_does_disturb_other_keys(rng):
    """The counterpart of the test above: without eq. 5 the other keys do move."""
    c_inv = memit.inverse_covariance(_covariance(rng))
    new = rng.normal(size=(D_IN, 2))
    other = new[:, :1] + 0.3 * rng.normal(size=(D_IN, 1))
    delta_w = rng.normal(size=(D_OUT, 2)) @ memit.solve_update(new, c_inv, lam=1e-6)
    assert np.abs(delta_w @ other).max() > 1e-2


def test_per_memory_factors_sum_to_the_batch_update(rng):
    c_inv = memit.inverse_covariance(_covariance(rng))
    # Three memories with 2, 1 and 2 key columns, plus two constraint columns.
    owner = (0, 0, 1, 2, 2, -1, -1)
    keys = rng.normal(size=(D_IN, len(owner)))
    residuals = rng.normal(size=(3, D_OUT))
    columns = memit.Columns(owner)
    r = np.stack([residuals[o] if o >= 0 else np.zeros(D_OUT) for o in owner], axis=1)
    m = memit.solve_update(keys, c_inv, lam=0.1)
    factors = memit.rank_one_factors(m, residuals, columns)
    assert [(u.shape, v.shape) for u, v in factors] == [((D_OUT, 1), (1, D_IN))] * 3
    np.testing.assert_allclose(sum(u @ v for u, v in factors), r @ m, rtol=1e-5, atol=1e-6)


def test_residual_is_spread_over_the_remaining_layers():
    total = np.ones(4) * 12.0
    shares = []
    remaining = total.copy()
    for i in range(4):
        share = memit.spread(remaining, i, 4)
        shares.append(share[0])
        remaining = remaining - share
    assert shares == [3.0, 3.0, 3.0, 3.0]
    assert remaining[0] == pytest.approx(0.0)


def test_held_keys_stay_put_under_a_large_lambda(rng):
    """λ shrinks the new edit; the held keys' zero residual must not loosen with it."""
    c_inv = memit.inverse_covariance(_covariance(rng))
    new = rng.normal(size=(D_IN, 2))
    held = rng.normal(size=(D_IN, 6))
    residual = np.concatenate([rng.normal(size=(D_OUT, 2)), np.zeros((D_OUT, 6))], axis=1)
    lam = 50.0  # comparable to kᵀĈ⁻¹k here: the new edit reaches only part of its target

    def disturbance(lam_hold: float) -> float:
        keys = memit.with_held_keys(new, held, lam, lam_hold)
        delta_w = residual @ memit.solve_update(keys, c_inv, lam)
        return np.abs(delta_w @ held).max() / np.abs(delta_w @ new).max()

    loose, firm = disturbance(lam_hold=lam), disturbance(lam_hold=1e-6)
    assert firm < 1e-4
    assert loose > 100 * firm
