"""Stage ``apply`` of a batch: compute its weight change and commit the entry.

* edit: materialise the parent state again, load the targets from ``keys_values.parquet`` and the
  covariances from ``data/covariance`` (keyed on the *base* model's fingerprint, so every batch
  reuses the same ones), replay the recorded targets through the edit driver (every spread, in order),
  let the collapse guard judge the result if ``guard.max_ppl_ratio`` is set
  (:mod:`pipeline.stages.guard`: a refused batch is committed as refused and changes no weights),
  and commit the deltas.  A non-finite update stops the batch before anything is written;
* revert: commit the target state's recorded fingerprints (no weights are computed);
* drop: rebuild the new state from the base (exact) or subtract the batch's delta (fast), commit;
* checkpoint: rebuild the state after its parent, save its edited weights and the history table of
  every batch before it (what ``editledger log`` then reads instead of those batches), commit.

Committing writes ``entry.json``, ``deltas.safetensors`` and, last, ``state.json``
(:mod:`pipeline.ledger.commit`); a process killed before that leaves no entry.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.editing.driver import Replay, drive
from pipeline.ledger import commit_drop, commit_edit, commit_revert, read_batch
from pipeline.ledger.commit import commit_checkpoint
from pipeline.ledger.entry import Entry
from pipeline.ledger.layout import KV_FILE, STATE_FILE
from pipeline.ledger.store import load
from pipeline.models.adapters import adapter_for
from pipeline.stages.common import (Project, RuleInputs, StageError, base_model, needed_covariances, open_edit_batch,
                                    rule_inputs)
from pipeline.stages.covariance import cached_covariances
from pipeline.stages.guard import judge
from pipeline.stages.summary import ledger_table, parquet_bytes
from pipeline.stages.targets_file import read_targets


def apply_edit(batch_dir: Path) -> Entry:
    eb = open_edit_batch(batch_dir, "apply")
    spec, hp, reqs, lm = eb.spec, eb.hp, eb.requests, eb.lm
    model, tok = lm.model, lm.tokenizer
    timings = {"materialize_s": eb.materialize_s}
    passes, meta = read_targets(eb.dir / KV_FILE)
    if meta["layer"] != hp.layers[-1] or set(meta["sites"]) != set(spec.sites) or len(passes[0].steps) != len(reqs):
        raise StageError(f"{KV_FILE} does not belong to this batch's method/requests; rerun its keys_values stage")
    t0 = time.perf_counter()
    targets = needed_covariances(spec, hp)
    covs, ids = cached_covariances(eb.project, lm, targets, hp)
    rule = rule_inputs(eb, covs, ids)
    timings["covariance_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:  # the recorded passes' spreads, in order
        run = drive(model, tok, adapter_for(model), reqs, meta["prefixes"], spec, hp, covs, Replay(passes), apply=False,
                    history=rule.history, spectra=rule.spectra)
    except FloatingPointError as exc:
        raise StageError(f"{eb.dir.name}: {exc}; the batch is not committed and the previous state stays "
                         "active") from None
    deltas, layers = run.deltas, run.layers
    timings["spread_s"] = time.perf_counter() - t0
    metrics = {"steps": sum(v.steps for v in passes).tolist(), "layers": layers,
               "health": health(model, deltas, eb.base_norms, layers, rule),
               **({"iterations": meta["iterations"]} if meta.get("iterations") else {}),
               **({"editing_neighbors": meta["editing_neighbors"]} if meta.get("editing_neighbors") else {}),
               **({"anchored": meta["anchored"]} if meta.get("anchored") else {})}
    decision = None
    max_ratio = eb.project.params()["guard"]["max_ppl_ratio"]
    if max_ratio is not None and eb.batch.reapplies is None:
        t0 = time.perf_counter()
        chain = load(eb.project.ledger, upto=eb.batch.parent)[0] if eb.batch.parent else []
        verdict = judge(eb.project, max_ratio, model, tok, deltas, chain, lm.fingerprint)
        decision, metrics["guard"] = verdict.decision(), verdict.record()
        timings["guard_s"] = time.perf_counter() - t0
    return commit_edit(eb.dir, base_fingerprint=lm.fingerprint, model=model, deltas=deltas,
                       covariance_ids={f"{r}@{layer}": ids[(r, layer)] for r, layer in targets},
                       timings={**meta["timings"], **timings}, metrics=metrics, guard=decision, keys=run.keys)


@torch.no_grad()
def health(model, deltas: dict, base_norms: dict[str, float], layers: list[dict], rule: RuleInputs) -> dict:
    """Per-batch health of the state this batch makes: ‖W‖/‖W₀‖ of every written matrix (the norm
    growth that precedes collapse), the null-space projector's rank per layer, and how many earlier
    entries the rule's history covers."""
    params = dict(model.named_parameters())
    ratio = {n: float((params[n].detach().double() + d.double().to(params[n].device)).norm()) / base_norms[n]
             for n, d in sorted(deltas.items())}
    out = {"weight_norm_ratio": ratio, "max_weight_norm_ratio": max(ratio.values())}
    ranks = {f"{r['role']}@{r['layer']}": r["projector_rank"] for r in layers if "projector_rank" in r}
    if ranks:
        out["projector_rank"] = ranks
    if rule.history is not None:
        out["history_entries"] = rule.history_entries
        if rule.history_missing:
            out["history_missing"] = rule.history_missing
    return out


def run(batch_dir: str | Path) -> Entry:
    batch_dir = Path(batch_dir).resolve()
    if (batch_dir / STATE_FILE).exists():  # refused before any work (the commit would refuse it anyway)
        raise StageError(f"{batch_dir.name} is already committed; the ledger never rewrites an entry (`dvc repro` "
                         "deletes a stage's outputs before it reruns one)")
    project = Project.of_batch(batch_dir)
    batch = read_batch(batch_dir)
    if batch.kind == "edit":
        return apply_edit(batch_dir)
    if batch.kind == "revert":
        return commit_revert(batch_dir)
    if batch.kind == "checkpoint":
        index = ledger_table(project.ledger, before_seq=batch.seq)
        return commit_checkpoint(batch_dir, base_model(project).model, parquet_bytes(index), inplace=True)
    entry, _ = commit_drop(batch_dir, base_model(project).model, inplace=True)
    return entry
