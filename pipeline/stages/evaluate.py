"""Stage ``evaluate`` of an edit batch: its requests before (parent state) and after (this entry).

Writes ``eval.parquet`` (one row per prompt and phase: rewrite, paraphrase and neighbourhood
prompts with their probabilities and success) and ``metrics.json`` (the CounterFact/zsRE
metrics pre and post, sealed and naming the entry id it evaluated; DVC shows it as metrics).
Retention of earlier batches and the ME-PPL collapse check are left to a later stage.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import pandas as pd

from pipeline.evaluation.protocols import evaluate
from pipeline.ledger import read_batch, read_requests, write_evaluation
from pipeline.ledger.layout import KV_FILE
from pipeline.ledger.replay import materialize
from pipeline.stages.keys_values import read_passes
from pipeline.ledger.store import load
from pipeline.stages.common import Project, StageError, base_model


def _finite(metrics: dict) -> dict:
    """NaN (a kind of prompt the requests do not have) → None: metrics.json is canonical JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def run(batch_dir: str | Path) -> dict:
    batch_dir = Path(batch_dir).resolve()
    project = Project.of_batch(batch_dir)
    batch = read_batch(batch_dir)
    if batch.kind != "edit":
        raise StageError(f"{batch_dir.name} is a {batch.kind} batch: it has no evaluate stage")
    entry = load(project.ledger, upto=batch_dir.name)[0][-1]
    reqs = read_requests(batch_dir)
    lm = base_model(project)
    # neighbour-assisted batches: the neighbours used for editing are not specificity tests
    kv = batch_dir / KV_FILE
    editing_neighbors = read_passes(kv)[1].get("editing_neighbors") if kv.exists() else None
    results, rows, timings = {}, [], {}
    for phase, upto in (("pre", batch.parent), ("post", batch_dir.name)):
        t0 = time.perf_counter()
        model = copy.deepcopy(lm.model)
        if upto is not None:
            materialize(project.ledger, upto, model, inplace=True)
        metrics, df = evaluate(model, lm.tokenizer, reqs, editing_neighbors)
        results[phase] = _finite(metrics)
        rows.append(df.assign(phase=phase))
        timings[f"{phase}_s"] = time.perf_counter() - t0
    doc = {"method": batch.method, "n_requests": len(reqs), "pre": results["pre"], "post": results["post"],
           "timings": timings}
    return write_evaluation(entry, pd.concat(rows, ignore_index=True), doc)
