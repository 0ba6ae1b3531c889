"""benchmarks/history_span.py: the measures of how much key space a stream's history pins."""

from __future__ import annotations

import pytest
import torch
from benchmark_support import load_benchmark


def test_the_span_of_a_known_history_is_counted_per_rule():
    hs = load_benchmark("history_span")
    cov = torch.diag(torch.arange(8, 0, -1, dtype=torch.float64))  # eigenvalues 8 … 1 on axes 0 … 7
    keys = torch.zeros(3, 8, dtype=torch.float64)
    keys[0, 7] = keys[1, 6] = keys[2, 0] = 10.0  # two keys in the null space (the 4 smallest axes), one outside
    history = keys.T @ keys
    row = hs.span(history, cov, lam=1.0, share=0.5, alpha=10.0, n=3)
    assert row["rank99"] == 3 and row["participation"] == pytest.approx(3.0)
    assert row["projector_rank"] == 4 and row["in_projector"] == pytest.approx(2 / 3)
    assert row["pinned_ns"] == 2  # only the two keys inside the projector outweigh αI there
    assert row["pinned_joint"] == 3  # 100 / (λ c) = 100, 50, 12.5 > 1
    assert hs.span(history, cov, lam=20.0, share=0.5, alpha=10.0, n=3)["pinned_joint"] == 2  # 5, 2.5, 0.625
    assert hs.span(history, cov, lam=1.0, share=0.5, alpha=150.0, n=3)["pinned_ns"] == 0
    assert row["key_energy"] == pytest.approx(300 / 3 / 36)
