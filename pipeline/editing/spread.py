"""The closed-form layer update and how the residual is divided over critical layers.

Pure tensor math, no model: ``Δ = R Kᵀ (λC + K Kᵀ)⁻¹`` minimises
``‖W K − (W K + R)‖² + λ‖Δ K0‖²`` with ``C = E[k0 k0ᵀ]`` standing in for the preserved keys.
It is solved (Cholesky, float64), never inverted.
"""

from __future__ import annotations

import math

import torch


def spread_divisor(spread: str, remaining: int) -> float:
    """Share of the residual written at a layer with ``remaining`` critical layers left (itself
    included): MEMIT's even spread divides by ``remaining`` (= L − l + 1 for a contiguous range),
    PMET's square-root spread by its square root, so lower layers take a larger share."""
    if remaining < 1:
        raise ValueError(f"remaining layers must be ≥ 1, got {remaining}")
    if spread == "even":
        return float(remaining)
    if spread == "sqrt":
        return math.sqrt(remaining)
    raise ValueError(f"unknown spread {spread!r}")


def closed_form_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    """``Δ [d_out, d_in]`` for keys ``[N, d_in]`` and residuals ``[N, d_out]`` (float64 result)."""
    k = keys.double()
    r = resid.double()
    a = lam * cov.double().to(k.device) + k.T @ k
    rhs = k.T @ r  # [d_in, d_out]
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        x = torch.cholesky_solve(rhs, chol)
    else:  # not numerically positive definite (e.g. a degenerate covariance): general solve
        x = torch.linalg.solve(a, rhs)
    return x.T
