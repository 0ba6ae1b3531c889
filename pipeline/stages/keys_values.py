"""Stage ``keys_values`` of an edit batch: the target values of its requests, on the parent state.

Materialises the parent state (base model + replay of the active chain, checked bit for bit
against the parent's recorded fingerprint), samples the context prefixes, picks the neighbours of
neighbour-assisted editing, and runs the edit driver (:mod:`pipeline.editing.driver`) as far as the
targets need: the last spread is left to the ``apply`` stage, which replays the recorded targets
through the same driver.  A method whose targets depend on spreads (iterative editing, separate
optimisation) runs those here, and so reads the covariances.  Writes ``keys_values.parquet``
(:mod:`pipeline.stages.targets_file`) and the optimisation trace ``trace.parquet``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from pipeline.editing.context import context_prefixes
from pipeline.editing.driver import Optimise, drive, interleaves
from pipeline.editing.engine import validate_inputs
from pipeline.editing.neighbors import select_neighbors
from pipeline.ledger import atomic
from pipeline.ledger.layout import KV_FILE, TRACE_FILE
from pipeline.models.adapters import adapter_for
from pipeline.stages.common import RuleInputs, needed_covariances, open_edit_batch, rule_inputs
from pipeline.stages.covariance import cached_covariances
from pipeline.stages.targets_file import targets_table


def run(batch_dir: str | Path) -> dict:
    eb = open_edit_batch(batch_dir, "keys_values")
    atomic.remove_stale_temps(eb.dir)  # of an attempt that was killed mid-write
    model, tok, hp, spec = eb.lm.model, eb.lm.tokenizer, eb.hp, eb.spec
    timings = {"materialize_s": eb.materialize_s}
    validate_inputs(model, tok, eb.requests, spec, hp)
    torch.manual_seed(eb.batch.seed)
    t0 = time.perf_counter()
    prefixes = context_prefixes(model, tok, hp)
    timings["prefixes_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    chosen = select_neighbors(model, tok, eb.requests, hp.neighbors) if hp.neighbors else None
    extra = {"editing_neighbors": chosen.indices} if chosen else {}
    covs, rule = {}, RuleInputs(None, None)
    if interleaves(spec, hp):
        covs, ids = cached_covariances(eb.project, eb.lm, needed_covariances(spec, hp), hp)
        rule = rule_inputs(eb, covs, ids)
    run = drive(model, tok, adapter_for(model), eb.requests, prefixes, spec, hp, covs,
                Optimise(eb.batch.engine, chosen, progress=True, anchors=eb.anchors), apply=False,
                history=rule.history, spectra=rule.spectra, spread_last=False)
    if run.iterations:
        extra["iterations"] = run.iterations
    if hp.norm_anchor_skip is not None:  # requests whose target NAS left unwritten, per pass
        extra["anchored"] = {"skipped": [[i for i in range(len(eb.requests))
                                          if all(torch.equal(v.targets[s][i], v.init[s][i]) for s in v.targets)]
                                         for v in run.values]}
    timings["values_s"] = time.perf_counter() - t0
    atomic.write_parquet(eb.dir / KV_FILE, targets_table(run.values, prefixes, hp.layers[-1], timings, extra))
    atomic.write_parquet(eb.dir / TRACE_FILE, pd.DataFrame([row for v in run.values for row in v.trace]))
    return {"requests": len(eb.requests), "steps": sum(v.steps for v in run.values).tolist(), **timings}
