"""Update rules: how one written layer's weight change is solved from its keys and residuals.

Pure tensor math, no model.  Every rule is a function of one :class:`LayerSystem` (this batch's
keys ``K [N, d_in]`` and residuals ``R [N, d_out]`` at the layer, the unedited model's key second
moment ``C``, the region's λ, and the history state the driver passes in explicitly) and the
hyper-parameters, returning the update ``Δ [d_out, d_in]`` in float64 and a few numbers worth
recording.  :data:`SOLVERS` maps the ``solver`` hyper-parameter to the rule; adding a rule is one
entry here plus the hyper-parameters it reads.

``closed_form`` (MEMIT, PMET, JEEP): ``Δ = Rᵀ K (λC + KᵀK + λₙI)⁻¹`` minimises
``‖Δ Kᵀ − Rᵀ‖² + λ‖Δ K₀ᵀ‖² + λₙ‖Δ‖²`` with ``C = E[k₀ k₀ᵀ]`` standing in for the preserved keys;
``λₙ = norm_weight`` is ENCORE's norm term (Gupta et al. 2025), 0 by default.  Solved (Cholesky,
float64), never inverted.

``joint``: the closed form with the earlier edits' keys kept as well,
``Δ = Rᵀ K (λC + K_pᵀK_p + KᵀK + λₙI)⁻¹``.  With ``R`` read on the current model this is recursive
least squares: applied batch after batch, the summed change equals editing every request of the
history in *one* batch from the unedited weights, ``Δ_total = R₀ᵀ K_all (λC + K_allᵀK_all)⁻¹``
(``R₀`` against the unedited weights; keys as recorded), instead of a sum of separately regularised
batches whose errors add up (tests/test_solvers.py checks the identity).  A stream then costs the
model what one batch of all its requests would.

``null_space`` (AlphaEdit, Fang et al. 2025): the update is confined to the null space of the
preserved knowledge, ``P = U₀U₀ᵀ`` over the eigenvectors of ``C`` with the smallest eigenvalues
(the share ``null_space_share`` of them), and also keeps the keys of the earlier edits still active
(``K_p``, the history): ``Δ = Rᵀ K P ((K_pᵀK_p + KᵀK) P + αI)⁻¹``.  The solution satisfies
``Δ = Δ P``, so any key in the range of ``I − P`` maps to exactly what it mapped to before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LayerSystem:
    """The least-squares problem of one written (role, layer)."""

    keys: torch.Tensor  # [N, d_in] this batch's keys (mean over context prefixes)
    resid: torch.Tensor  # [N, d_out] the share of the target gap this layer writes
    cov: torch.Tensor  # [d_in, d_in] E[k kᵀ] of the unedited model over the corpus
    lam: float  # λ of the region
    # [d_in, d_in] Σ K_pᵀ K_p over the keys of the earlier edits still active (None: no history given)
    history: torch.Tensor | None = None
    # (eigenvalues ascending [d_in], eigenvectors [d_in, d_in]) of cov, for rules that use its spectrum
    spectrum: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class Solver:
    """A rule: ``solve(system, hp) -> (Δ [d_out, d_in] float64, numbers for the layer's record)``."""

    solve: Callable[[LayerSystem, Any], tuple[torch.Tensor, dict]]
    uses_spectrum: bool = False  # the caller supplies LayerSystem.spectrum (cached per covariance)
    uses_history: bool = False  # the update depends on LayerSystem.history
    label: str = ""  # how `log` and the tables name it among a batch's modifiers ('' = the default rule)


def _solve_spd(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol)
    return torch.linalg.solve(a, rhs)  # not numerically positive definite (a degenerate covariance)


def closed_form_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, lam: float,
                       norm_weight: float = 0.0, history: torch.Tensor | None = None) -> torch.Tensor:
    """``Δ [d_out, d_in]`` for keys ``[N, d_in]`` and residuals ``[N, d_out]`` (float64 result);
    ``history`` (Σ K_pᵀK_p) adds the earlier edits' keys to the preserved ones."""
    k = keys.double()
    r = resid.double()
    a = lam * cov.double().to(k.device) + k.T @ k
    if history is not None:
        a = a + history.double().to(k.device)
    if norm_weight:
        a = a + norm_weight * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return _solve_spd(a, k.T @ r).T  # rhs [d_in, d_out]


def null_space_projector(spectrum: tuple[torch.Tensor, torch.Tensor], share: float) -> torch.Tensor:
    """``P = U₀U₀ᵀ`` over the ``round(share · d)`` eigenvectors with the smallest eigenvalues."""
    _, vectors = spectrum
    rank = max(1, round(share * vectors.shape[1]))
    u0 = vectors[:, :rank].double()
    return u0 @ u0.T


def null_space_update(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, history: torch.Tensor | None,
                      alpha: float) -> torch.Tensor:
    """AlphaEdit's ``Δ = Rᵀ K P ((H + KᵀK) P + αI)⁻¹`` with ``H = K_pᵀ K_p`` (float64)."""
    k, r, p = keys.double(), resid.double(), projector.double().to(keys.device)
    s = k.T @ k
    if history is not None:
        s = s + history.double().to(k.device)
    # Δ M = Rᵀ K P with M = S P + αI; transposed (P, S symmetric): (P S + αI) Δᵀ = P Kᵀ R
    a = p @ s + alpha * torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    return torch.linalg.solve(a, p @ (k.T @ r)).T


def closed_form(system: LayerSystem, hp: Any) -> tuple[torch.Tensor, dict]:
    return closed_form_update(system.keys, system.resid, system.cov, system.lam, hp.norm_weight), {}


def joint(system: LayerSystem, hp: Any) -> tuple[torch.Tensor, dict]:
    return closed_form_update(system.keys, system.resid, system.cov, system.lam, hp.norm_weight, system.history), {}


def null_space(system: LayerSystem, hp: Any) -> tuple[torch.Tensor, dict]:
    if system.spectrum is None:
        raise ValueError("the null_space rule needs the covariance's spectrum")
    values, vectors = system.spectrum  # cached on the CPU; the d×d projector is formed where the keys are (a GPU)
    p = null_space_projector((values, vectors.to(system.keys.device)), hp.null_space_share)
    upd = null_space_update(system.keys, system.resid, p, system.history, hp.null_space_alpha)
    return upd, {"projector_rank": max(1, round(hp.null_space_share * p.shape[0]))}


SOLVERS: dict[str, Solver] = {
    "closed_form": Solver(closed_form),
    "joint": Solver(joint, uses_history=True, label="jt"),
    "null_space": Solver(null_space, uses_spectrum=True, uses_history=True, label="ns"),
}
