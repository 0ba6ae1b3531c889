"""The probes as a stage/command: CounterFact records → Parquet table + PNG plot.

``run_probe`` loads the model (the project's base model inside the DVC pipeline, else any model
directory), takes records ``start .. start+n`` of the verified CounterFact file and writes
``<kind>.parquet`` and ``<kind>.png`` into ``out``.  The rewrite prompt of each record is probed
(its subject, its true object as the original answer and its new object as the target).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data import sample_records
from pipeline.requests import parse_record
from pipeline.ledger import atomic

KINDS = ("similarity", "logit-lens")


class ProbeError(ValueError):
    """Unknown probe kind or bad record range."""


def probe_items(records: list[dict]) -> tuple[list[tuple[str, str, str, str]], list]:
    reqs = [parse_record(rec, i) for i, rec in enumerate(records)]
    return [(r.prompt, r.subject, r.target_true, r.target_new) for r in reqs], [r.case_id for r in reqs]


def run_probe(kind: str, model, tok, records: list[dict], out: Path) -> Path:
    """Compute probe ``kind`` on ``records``; write ``out/<kind>.parquet`` and ``out/<kind>.png``."""
    from pipeline.probes.logit_lens import contrast_logit_lens
    from pipeline.probes.plots import plot_logit_lens, plot_similarity
    from pipeline.probes.similarity import component_similarity

    if kind not in KINDS:
        raise ProbeError(f"unknown probe {kind!r}; choose one of {', '.join(KINDS)}")
    items, ids = probe_items(records)
    if kind == "similarity":
        df = component_similarity(model, tok, [(t, s) for t, s, _, _ in items], record_ids=ids)
        plot = plot_similarity
    else:
        df = contrast_logit_lens(model, tok, items, record_ids=ids)
        plot = plot_logit_lens
    out.mkdir(parents=True, exist_ok=True)
    name = kind.replace("-", "_")
    atomic.write_parquet(out / f"{name}.parquet", df)
    plot(df, out / f"{name}.png")
    return out / f"{name}.parquet"


def records_for(start: int, n: int) -> list[dict]:
    if start < 0 or n < 1:
        raise ProbeError(f"need start ≥ 0 and n ≥ 1, got start={start}, n={n}")
    return sample_records("counterfact", start, n)
