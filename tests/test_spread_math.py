"""The closed-form layer update Δ = R Kᵀ (λC + K Kᵀ)⁻¹ and the spread divisors (pure tensor math)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.editing.solvers import closed_form_update
from pipeline.editing.spread import spread_divisor

D_IN, D_OUT, N_EDIT, N_SAMPLES = 24, 12, 4, 4000


@pytest.fixture
def setup():
    """An anisotropic key distribution C = L Lᵀ, samples K0 from it, edit keys K, residuals R."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -1.5, D_IN, dtype=torch.float64)  # some directions rarely used
    L = q * scales  # C = L Lᵀ
    k0 = torch.randn(N_SAMPLES, D_IN, generator=g, dtype=torch.float64) @ L.T  # rows k = L z
    cov = k0.T @ k0 / N_SAMPLES
    keys = torch.randn(N_EDIT, D_IN, generator=g, dtype=torch.float64) * 0.5
    resid = torch.randn(N_EDIT, D_OUT, generator=g, dtype=torch.float64)
    probe = torch.randn(500, D_IN, generator=g, dtype=torch.float64) @ L.T  # fresh preserved keys
    return dict(L=L, cov=cov, keys=keys, resid=resid, probe=probe)


def _fit_error(delta, keys, resid):
    return float((keys @ delta.T - resid).norm())


def _probe_motion(delta, probe):
    return float((probe @ delta.T).norm(dim=-1).mean())


def test_shapes_and_dtype(setup):
    d = closed_form_update(setup["keys"].float(), setup["resid"].float(), setup["cov"].float(), 1.0)
    assert d.shape == (D_OUT, D_IN)
    assert d.dtype == torch.float64


@pytest.mark.parametrize("lam", [1e-3, 1.0, 50.0, 1e4])
def test_normal_equations(setup, lam):
    """Δ (λC + Kᵀ K) = Rᵀ K with keys as rows [N, d_in] and residuals as rows [N, d_out]."""
    k, r, c = setup["keys"], setup["resid"], setup["cov"]
    d = closed_form_update(k, r, c, lam)
    lhs = d @ (lam * c + k.T @ k)
    torch.testing.assert_close(lhs, r.T @ k, atol=1e-8, rtol=1e-8)


def test_small_lambda_fits_edits_exactly(setup):
    k, r, c = setup["keys"], setup["resid"], setup["cov"]
    d = closed_form_update(k, r, c, 1e-6)
    assert _fit_error(d, k, r) < 1e-3 * float(r.norm())


def test_edit_on_a_weight_matrix(setup):
    """(W + Δ) k ≈ W k + r for the edited keys; preserved keys move little compared with ‖r‖."""
    k, r, c, probe = setup["keys"], setup["resid"], setup["cov"], setup["probe"]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64)
    lam = 0.5
    d = closed_form_update(k, r, c, lam)
    new_w = w + d
    err = float((k @ new_w.T - (k @ w.T + r)).norm())
    assert err < 0.2 * float(r.norm())
    assert _probe_motion(d, probe) < 0.2 * float(r.norm(dim=-1).mean())


def test_large_lambda_still_moves_towards_the_edits(setup):
    k, r, c, probe = setup["keys"], setup["resid"], setup["cov"], setup["probe"]
    d = closed_form_update(k, r, c, 1e3)
    assert _fit_error(d, k, r) < float(r.norm())  # closer than before the update (Δ = 0)
    assert _probe_motion(d, probe) < 0.05 * float(r.norm(dim=-1).mean())


def test_lambda_trades_fit_against_preservation_monotonically(setup):
    k, r, c, probe = setup["keys"], setup["resid"], setup["cov"], setup["probe"]
    lams = [1e4, 1e3, 1e2, 10.0, 1.0, 0.1, 1e-2, 1e-3]
    fits, costs = [], []
    for lam in lams:
        d = closed_form_update(k, r, c, lam)
        fits.append(_fit_error(d, k, r))
        costs.append(float(torch.trace(d @ c @ d.T)))  # E‖Δ k0‖² under the covariance
    assert all(a > b for a, b in zip(fits, fits[1:])), fits
    assert all(a < b for a, b in zip(costs, costs[1:])), costs
    assert fits[0] < float(r.norm()) and fits[-1] < 0.05 * float(r.norm())


def test_matches_explicit_inverse(setup):
    k, r, c = setup["keys"], setup["resid"], setup["cov"]
    lam = 3.0
    expected = r.T @ k @ torch.linalg.inv(lam * c + k.T @ k)
    torch.testing.assert_close(closed_form_update(k, r, c, lam), expected, atol=1e-9, rtol=1e-7)


def test_float32_inputs_are_solved_in_float64(setup):
    k, r, c = setup["keys"], setup["resid"], setup["cov"]
    d32 = closed_form_update(k.float(), r.float(), c.float(), 2.0)
    d64 = closed_form_update(k.float().double(), r.float().double(), c.float().double(), 2.0)
    assert torch.equal(d32, d64)


def test_indefinite_system_falls_back_to_general_solve(setup):
    """A non-positive-definite λC + KᵀK (Cholesky fails) is still solved, not inverted blindly."""
    k, r = setup["keys"], setup["resid"]
    cov = -torch.eye(D_IN, dtype=torch.float64)
    lam = 0.7
    a = lam * cov + k.T @ k
    assert int(torch.linalg.cholesky_ex(a)[1]) != 0
    d = closed_form_update(k, r, cov, lam)
    torch.testing.assert_close(d @ a, r.T @ k, atol=1e-8, rtol=1e-8)


def test_zero_residual_gives_zero_update(setup):
    d = closed_form_update(setup["keys"], torch.zeros(N_EDIT, D_OUT, dtype=torch.float64), setup["cov"], 5.0)
    assert torch.count_nonzero(d) == 0


# ------------------------------------------------------------------------------------ spread
@pytest.mark.parametrize("remaining", [1, 2, 3, 5, 30])
def test_spread_divisor_values(remaining):
    assert spread_divisor("even", remaining) == float(remaining)
    assert spread_divisor("sqrt", remaining) == pytest.approx(math.sqrt(remaining), rel=0, abs=1e-15)
    assert spread_divisor("sqrt", remaining) <= spread_divisor("even", remaining)


def test_spread_divisor_last_layer_takes_everything():
    assert spread_divisor("even", 1) == 1.0 == spread_divisor("sqrt", 1)


@pytest.mark.parametrize("remaining", [0, -1])
def test_spread_divisor_rejects_no_layers(remaining):
    with pytest.raises(ValueError, match="≥ 1"):
        spread_divisor("even", remaining)


@pytest.mark.parametrize("spread", ["linear", "", "EVEN", None])
def test_spread_divisor_rejects_unknown_spread(spread):
    with pytest.raises(ValueError, match="unknown spread"):
        spread_divisor(spread, 2)
