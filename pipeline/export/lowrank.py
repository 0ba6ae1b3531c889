"""Exact low-rank factors of a weight change, by a numerical rank (pure tensor math).

A locate-then-edit batch of N requests changes a matrix by rank ≤ N (Δ = R Kᵀ (C + KKᵀ)⁻¹), so the
summed change of a history is low-rank until the history is long.  The factors come from the SVD in
float64, truncated at the *numerical* rank: singular values above ``max(rtol · s_max, atol)``.
``rtol`` defaults to ``max(m, n) · ε_float32``, the convention of ``numpy.linalg.matrix_rank`` for
float32 data (weights and deltas are float32); ``atol`` is the caller's floor, the float32
resolution of the weight the change is added to (``ε_float32 · ‖W‖_F`` bounds the rounding of a
float32 matrix), so that a change made only of rounding, e.g. ``W + a − a`` after a fast drop, has
rank 0 rather than full rank.  What is cut is float32 rounding, not edit: the weights of a state are
``fl32(W + Δ₁ + Δ₂ …)``, whose difference from the base carries rounding noise of rank ``min(m, n)``
some seven orders of magnitude below the edit (measured on SmolLM2: singular values 4–9 kept,
≤ 5·10⁻⁷ cut).

The SVD runs on one thread: LAPACK's blocked algorithms give other last bits with another thread
count (measured), and an export must be the same bytes for the same state.  Each singular pair's
sign is fixed (largest entry of the left vector positive) so the factors do not depend on the
sign convention of the LAPACK build either.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


class RankError(ValueError):
    """The change is full rank: no factorisation is smaller than the matrix itself."""

    def __init__(self, rank: int, shape: tuple[int, int], tol: float):
        self.rank, self.shape = rank, shape
        super().__init__(f"its numerical rank is {rank}, the full rank of a {shape[0]}×{shape[1]} matrix (singular "
                         f"values above {tol:.3g})")


@dataclass(frozen=True)
class LowRank:
    """``delta ≈ b @ a`` with ``b`` [out, rank] and ``a`` [rank, in] (balanced: each carries √s)."""

    b: torch.Tensor
    a: torch.Tensor
    rank: int
    rtol: float  # the cut-off relative to s_max
    atol: float  # the absolute floor of the cut-off
    tol: float  # the cut-off applied: max(rtol · s_max, atol)
    s_max: float
    s_next: float  # the largest singular value cut off (0 if none): how clean the cut is
    residual: float  # ‖delta − b a‖_F / ‖delta‖_F of the stored factors (0 for a zero delta)
    max_abs_error: float  # max |delta − b a| of the stored factors


def default_rtol(shape: tuple[int, ...]) -> float:
    return max(shape) * torch.finfo(torch.float32).eps


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (bit-reproducible LAPACK results)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def factor(delta: torch.Tensor, rtol: float | None = None, atol: float = 0.0) -> LowRank:
    """Float32 factors of an ``[out, in]`` change; :class:`RankError` if its numerical rank is ``min(out, in)``."""
    if delta.ndim != 2:
        raise ValueError(f"a weight change to factor must be a matrix, got shape {tuple(delta.shape)}")
    d = delta.detach().to("cpu", torch.float64)
    rtol = default_rtol(tuple(d.shape)) if rtol is None else float(rtol)
    with one_thread():
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        s_max = float(s[0]) if s.numel() else 0.0
        tol = max(rtol * s_max, float(atol))
        rank = int((s > tol).sum()) if s_max > 0 else 0
        if rank >= min(d.shape):
            raise RankError(rank, (d.shape[0], d.shape[1]), tol)
        s_next = float(s[rank]) if rank < s.numel() else 0.0
        u, root, vh = u[:, :rank], s[:rank].sqrt(), vh[:rank]
        sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True))).squeeze(0)
        b = (u * (root * sign)).float().contiguous()
        a = ((root * sign)[:, None] * vh).float().contiguous()
        err = d - b.double() @ a.double()
        norm = float(d.norm())
        return LowRank(b, a, rank, rtol, float(atol), tol, s_max, s_next,
                       float(err.norm()) / norm if norm > 0 else 0.0, float(err.abs().max()))
