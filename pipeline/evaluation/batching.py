"""Batches whose results do not depend on what else is in the batch.

A sequence's logits change in the last bits with the padding around it (attention reduces over
the padded width, and the reduction's rounding depends on that width) and with how many rows a
matrix product has (BLAS takes another kernel below :data:`MIN_ROWS` rows; measured on this CPU:
1–3 rows differ from the rest, 4 and more agree).  So teacher-forced scoring forwards only sequences
of *one length* together, never padded, and never fewer than :data:`MIN_ROWS` rows: a pair's
numbers are then a function of the model state and the pair alone, not of the other pairs scored
beside it (tested bit for bit), and the evaluation cache (:mod:`pipeline.evaluation.cache`)
returns exactly what a fresh computation in any other batch would give.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_ROWS = 4  # fewer rows take another BLAS kernel (other rounding); smaller batches are filled up


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by equal length (shortest first, input order within a length), in chunks of
    at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return [idx[s : s + batch_size] for n in sorted(groups) for idx in (groups[n],)
            for s in range(0, len(idx), batch_size)]


def filled(rows: list, fill) -> list:
    """``rows`` followed by copies of ``fill`` up to :data:`MIN_ROWS` (their results are dropped)."""
    return rows + [fill] * max(0, MIN_ROWS - len(rows))
