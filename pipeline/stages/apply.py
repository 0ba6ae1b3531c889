"""Stage ``apply`` of a batch: compute its weight change and commit the entry.

* edit: materialise the parent state again, load the targets from ``keys_values.parquet`` and the
  covariances from ``data/covariance`` (keyed on the *base* model's fingerprint, so every batch
  reuses the same ones), run phase 2 of the engine (:func:`pipeline.editing.engine.spread_targets`)
  and commit the deltas;
* revert: commit the target state's recorded fingerprints (no weights are computed);
* drop: rebuild the new state from the base (exact) or subtract the batch's delta (fast), commit.

Committing writes ``entry.json``, ``deltas.safetensors`` and, last, ``state.json``
(:mod:`pipeline.ledger.commit`); a process killed before that leaves no entry.
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.editing.covariance import cache_keys, entry_path, key_id, second_moments
from pipeline.editing.engine import spread_targets
from pipeline.editing.hparams import HParams
from pipeline.ledger import commit_drop, commit_edit, commit_revert, read_batch
from pipeline.ledger.entry import Entry
from pipeline.ledger.layout import KV_FILE
from pipeline.models.adapters import adapter_for
from pipeline.stages.common import Project, StageError, base_model, corpus, needed_covariances, open_edit_batch
from pipeline.stages.keys_values import read_values


def cached_covariances(project: Project, lm, targets: list[tuple[str, int]], hp: HParams):
    """The covariances of ``targets`` from ``data/covariance`` — never computed here: a missing one
    is a configuration error (the covariance stages own that folder)."""
    cfg = project.params()
    cor = corpus(project, cfg)
    dtype = hp.cov_dtype
    chunks = cor.chunks(lm.tokenizer, hp.cov_max_length, hp.cov_max_texts)
    ids = {t: key_id(k) for t, k in cache_keys(lm.fingerprint, cor, chunks, targets, hp.cov_max_length, dtype).items()}
    for (role, layer), kid in ids.items():
        folder = entry_path(project.covariance_dir, (role, layer), kid).parent
        if not folder.is_dir():
            raise StageError(f"no covariance for {role}@{layer}: {folder} does not exist; add layer {layer} (role "
                             f"{role}) under `covariance:` in params.yaml and run `dvc repro -P`")
        if not entry_path(project.covariance_dir, (role, layer), kid).exists():
            raise StageError(f"{folder} holds a covariance computed with other settings (model, corpus, "
                             "cov_max_length/cov_max_texts or cov_dtype) than this batch's hyper-parameters")
    return second_moments(lm.model, lm.tokenizer, adapter_for(lm.model), lm.fingerprint, cor, targets,
                          hp.cov_max_length, hp.cov_max_texts, hp.cov_batch_tokens, dtype, project.covariance_dir,
                          progress=False)


def apply_edit(batch_dir: Path) -> Entry:
    eb = open_edit_batch(batch_dir, "apply")
    spec, hp, reqs, lm = eb.spec, eb.hp, eb.requests, eb.lm
    model, tok = lm.model, lm.tokenizer
    timings = {"materialize_s": eb.materialize_s}
    values, meta = read_values(eb.dir / KV_FILE)
    if meta["layer"] != hp.layers[-1] or set(meta["sites"]) != set(spec.sites) or len(values.steps) != len(reqs):
        raise StageError(f"{KV_FILE} does not belong to this batch's method/requests; rerun its keys_values stage")
    t0 = time.perf_counter()
    targets = needed_covariances(spec, hp)
    covs, ids = cached_covariances(eb.project, lm, targets, hp)
    timings["covariance_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    deltas, layers = spread_targets(model, tok, adapter_for(model), reqs, meta["prefixes"], spec, hp, values, covs,
                                    apply=False)
    timings["spread_s"] = time.perf_counter() - t0
    return commit_edit(eb.dir, base_fingerprint=lm.fingerprint, model=model, deltas=deltas,
                       covariance_ids={f"{r}@{layer}": ids[(r, layer)] for r, layer in targets},
                       timings={**meta["timings"], **timings},
                       metrics={"steps": values.steps.tolist(), "layers": layers})


def run(batch_dir: str | Path) -> Entry:
    batch_dir = Path(batch_dir).resolve()
    project = Project.of_batch(batch_dir)
    batch = read_batch(batch_dir)
    if batch.kind == "edit":
        return apply_edit(batch_dir)
    if batch.kind == "revert":
        return commit_revert(batch_dir)
    entry, _ = commit_drop(batch_dir, base_model(project).model, inplace=True)
    return entry
