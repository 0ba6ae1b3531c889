"""Stage ``evaluate`` of an edit batch: everything a reader judges the edit by, with its baselines.

Model states and what is measured on each (settings: ``evaluation:`` in params.yaml):

* ``base`` — the unedited model: the batch's requests (protocol + generation metrics) and ME-PPL-50;
* ``pre`` — the parent state (before this batch): the batch's requests (protocol metrics only;
  for the first batch it *is* the base state and is not computed twice);
* ``post`` — this entry's state: the batch's requests (all metrics) and ME-PPL-50 (collapse);
* ``retention`` — this entry's state on earlier edits that are still active: all of them, or a
  seeded sample (:mod:`pipeline.evaluation.retention`), per protocol.

Writes ``eval.parquet`` (one row per prompt or generation and state: kind, prompt, targets,
probabilities, ranks, success; for retention rows the batch and index the request came from) and
``metrics.json`` — sealed, naming the entry id and the Parquet's sha256
(:func:`pipeline.ledger.write_evaluation`) — with every setting a number depends on (decoding,
retention mode, consistency reference, perplexity cut) recorded beside it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import distributed
from pipeline.evaluation.cache import StateCache
from pipeline.evaluation.perplexity import perplexity
from pipeline.evaluation.protocols import protocol_of
from pipeline.evaluation.retention import Candidate, plan
from pipeline.evaluation.suite import CONSISTENCY_REFERENCE, EvalSettings, by_protocol, evaluate_state, wikitext_tfidf
from pipeline.ledger import read_batch, read_requests, write_evaluation
from pipeline.ledger.atomic import canonical_json
from pipeline.ledger.layout import KV_FILE, METRICS_FILE
from pipeline.ledger.replay import materialize
from pipeline.stages.targets_file import read_targets
from pipeline.ledger.store import load
from pipeline.stages.common import CORPUS, Project, StageError, base_model, in_processes, me_ppl_texts


def finite(value: Any) -> Any:
    """NaN (a kind of prompt the requests do not have) → None, recursively: metrics.json is canonical JSON."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def retention_candidates(chain: list, active: tuple[str, ...]) -> tuple[list[Candidate], dict, dict]:
    """The requests of the active edit entries of ``chain`` but its last, as retention candidates,
    with the requests themselves by candidate (full records: evaluation needs their prompts) and
    the neighbour prompts each was edited with (neighbour-assisted batches), which stay out of its
    specificity in retention as they did after its own batch."""
    cands, reqs, neighbors = [], {}, {}
    for e in chain[:-1]:
        if e.id in active and e.kind == "edit":
            used = (e.manifest.get("metrics") or {}).get("editing_neighbors")
            for i, r in enumerate(read_requests(e.path)):
                c = Candidate(e.dirname, i, canonical_json(r.canonical()))
                cands.append(c)
                reqs[c] = r
                neighbors[c] = list(used[i]) if used else []
    return cands, reqs, neighbors


def after(chain: list, dirname: str) -> str:
    """The recorded full-model fingerprint of the state right after the entry in ``dirname``: what
    the evaluation cache keys that state's results on (materialize has checked it)."""
    return next(e for e in chain if e.dirname == dirname).fingerprints["after"]["model"]


def run(batch_dir: str | Path) -> dict:
    start = time.perf_counter()
    batch_dir = Path(batch_dir).resolve()
    project = Project.of_batch(batch_dir)
    batch = read_batch(batch_dir)
    if batch.kind != "edit":
        raise StageError(f"{batch_dir.name} is a {batch.kind} batch: it has no evaluate stage")
    cfg = project.params()
    processes = cfg["distributed"]["processes"]
    if processes > 1 and not distributed.launched():
        return _in_processes(batch_dir, processes)
    settings = EvalSettings.from_params(cfg["evaluation"])
    chain, states = load(project.ledger, upto=batch_dir.name)
    entry = chain[-1]
    reqs = read_requests(batch_dir)
    if not (project.root / CORPUS).exists():
        raise StageError(f"{project.root / CORPUS} does not exist: run `dvc repro -P` (stage data) first")
    tfidf = wikitext_tfidf(project.root / CORPUS)
    texts = me_ppl_texts(project)
    lm = base_model(project, distributed.init(cfg["model"]["device"]))
    # neighbour-assisted batches: the neighbours used for editing are not specificity tests
    kv = batch_dir / KV_FILE
    editing_neighbors = read_targets(kv)[1].get("editing_neighbors") if kv.exists() else None
    tok = lm.tokenizer
    results: dict[str, dict] = {}
    ppl: dict[str, float] = {}
    rows, timings = [], {}

    def measure(phase: str, model, cache, generation: bool) -> None:
        t0 = time.perf_counter()
        metrics, df = evaluate_state(model, tok, reqs, settings.generation, tfidf if generation else None,
                                     editing_neighbors, cache)
        results[phase] = finite(metrics)
        rows.append(df.assign(phase=phase))
        timings[f"{phase}_s"] = time.perf_counter() - t0

    def state(upto: str):
        model = copy.deepcopy(lm.model)
        return materialize(project.ledger, upto, model, inplace=True)

    base_cache = StateCache.of(lm.model, lm.fingerprint)
    measure("base", lm.model, base_cache, generation=True)
    t0 = time.perf_counter()
    ppl["base"] = perplexity(lm.model, tok, texts, settings.ppl_max_length, cache=base_cache)
    timings["perplexity_base_s"] = time.perf_counter() - t0
    if batch.parent is None:  # the parent state is the unedited model
        results["pre"] = {k: v for k, v in results["base"].items() if k not in ("fluency", "n_generations")
                          and not k.startswith("consistency")}
        rows.append(rows[0][rows[0]["kind"] != "generation"].assign(phase="pre"))
    else:
        parent = state(batch.parent)
        measure("pre", parent, StateCache.of(parent, after(chain, batch.parent)), generation=False)
    model = state(batch_dir.name)
    post_cache = StateCache.of(model, after(chain, batch_dir.name))
    measure("post", model, post_cache, generation=True)
    t0 = time.perf_counter()
    ppl["post"] = perplexity(model, tok, texts, settings.ppl_max_length, cache=post_cache)
    timings["perplexity_post_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cands, pool, used = retention_candidates(chain, states[-1].active)
    rp = plan(batch.seq, cands, settings.retention)
    chosen = [pool[c] for c in rp.chosen]
    retention = {**rp.describe(), "metrics": {}}
    for protocol, positions in by_protocol(chosen).items():
        group = [chosen[i] for i in positions]
        excluded = [used[rp.chosen[i]] for i in positions]
        metrics, df = evaluate_state(model, tok, group, settings.generation,
                                     tfidf if settings.retention.generation else None,
                                     excluded if any(excluded) else None, post_cache)
        retention["metrics"][protocol] = finite(metrics)
        origin = [rp.chosen[positions[i]] for i in df["request"]]
        rows.append(df.assign(phase="retention", batch=[c.batch for c in origin],
                              request=[c.index for c in origin]))
    timings["retention_s"] = time.perf_counter() - t0

    timings["total_s"] = time.perf_counter() - start
    doc = {"method": batch.method, "n_requests": len(reqs), "protocol": protocol_of(reqs[0]),
           "base": results["base"], "pre": results["pre"], "post": results["post"], "retention": retention,
           "perplexity": {"dataset": "ME-PPL-50", "n_texts": len(texts), "max_length": settings.ppl_max_length,
                          **ppl},
           "generation": {**settings.generation.describe(), "consistency": CONSISTENCY_REFERENCE},
           "timings": timings}
    table = pd.concat([r if "batch" in r else r.assign(batch=batch_dir.name) for r in rows], ignore_index=True)
    table["case_id"] = [None if v is None else str(v) for v in table["case_id"]]  # int (CounterFact) or str
    return write_evaluation(entry, table, doc) if distributed.is_main() else {"dir": entry.dirname, **doc}


def _in_processes(batch_dir: Path, processes: int) -> dict:
    """Run this stage under ``torchrun`` in ``processes`` processes (they share every state's
    batches; rank 0 writes); the metrics.json they wrote."""
    in_processes(processes, ["stage", "evaluate", "--batch", str(batch_dir)], f"evaluate {batch_dir.name}")
    return json.loads((batch_dir / METRICS_FILE).read_text())
