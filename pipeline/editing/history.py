"""The update rules' history state: what the keys of earlier edits still active add up to.

An edit records its keys at every layer it wrote (``EditResult.keys``: ``[N, d_in]`` read on the
edited model; the ledger keeps them per entry).  A rule that protects earlier edits (the null-space
rule's ``K_p``) reads ``Σ K_eᵀ K_e`` over the entries that are *active* now, summed in float64 in
their order in the history; it is recomputed from the active set for every batch, so after a
revert or drop it is exactly what the remaining entries imply, and nothing outlives a call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def key_gram(keys: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """"role@layer" → ``KᵀK`` (float64) of one edit's keys."""
    return {name: k.double().T @ k.double() for name, k in keys.items()}


def extended(history: Mapping[str, torch.Tensor], keys: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``history`` with one more edit's keys added (a new dict; ``history`` is not changed)."""
    total = dict(history)
    for name, gram in key_gram(keys).items():
        total[name] = total[name] + gram if name in total else gram
    return total


def history_of(edits: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``Σ_e K_eᵀ K_e`` per "role@layer" over the keys of ``edits``, in order."""
    total: dict[str, torch.Tensor] = {}
    for keys in edits:
        total = extended(total, keys)
    return total
