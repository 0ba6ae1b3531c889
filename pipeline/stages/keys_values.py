"""Stage ``keys_values`` of an edit batch: the target values of its requests, on the parent state.

Materialises the parent state (base model + replay of the active chain, checked bit for bit
against the parent's recorded fingerprint), samples the context prefixes, and runs phase 1 of the
engine (:func:`pipeline.editing.engine.compute_targets`).  Writes ``keys_values.parquet`` — one
row per (request, site) with the target value, the value before the edit and their difference as
fixed-size float lists, and the steps taken; the prefixes, sites and layer in the file's metadata
— and the optimisation trace ``trace.parquet``.

The keys themselves are not stored: the apply stage must recompute them layer by layer anyway,
because a layer's keys change once the layers below it are updated.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from pipeline.editing.context import context_prefixes
from pipeline.editing.engine import compute_targets, validate_inputs
from pipeline.editing.iterate import run_edit
from pipeline.editing.neighbors import select_neighbors
from pipeline.editing.values import ValueResult
from pipeline.ledger import atomic
from pipeline.ledger.layout import KV_FILE, TRACE_FILE
from pipeline.models.adapters import adapter_for
from pipeline.stages.common import open_edit_batch

META_KEY = b"editledger"


def values_table(values: ValueResult | list[ValueResult], prefixes: list[str], layer: int, timings: dict,
                 extra_meta: dict | None = None) -> pa.Table:
    """One row per (pass, request, site).  Methods whose optimisation and spread interleave (JEEP's
    separate optimisation, iterative editing) record every pass; sites of different widths (JEEP:
    m^L' and h^L*) are stored as variable-length lists."""
    passes = values if isinstance(values, list) else [values]
    rows: dict[str, list] = {"request": [], "site": [], "steps": [], "pass": []}
    vectors: dict[str, list] = {"target": [], "init": [], "delta": []}
    for k, v in enumerate(passes):
        for site in v.targets:
            for i in range(v.targets[site].shape[0]):
                rows["request"].append(i)
                rows["site"].append(site)
                rows["steps"].append(int(v.steps[i]))
                rows["pass"].append(k)
                for name, src in (("target", v.targets), ("init", v.init), ("delta", v.deltas)):
                    vectors[name].append(src[site][i].detach().float().cpu().numpy())
    dims = {len(x) for x in vectors["target"]}
    cols = {k: pa.array(v, pa.int32() if k != "site" else pa.string()) for k, v in rows.items()}
    for name, vecs in vectors.items():
        if len(dims) == 1:
            cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(vecs), pa.float32()), len(vecs[0]))
        else:
            cols[name] = pa.array([x.tolist() for x in vecs], pa.list_(pa.float32()))
    sites = list(dict.fromkeys(s for v in passes for s in v.targets))
    meta = {"prefixes": prefixes, "layer": layer, "sites": sites, "passes": len(passes),
            "dtype": str(next(iter(passes[0].targets.values())).dtype).replace("torch.", ""), "timings": timings,
            **(extra_meta or {})}
    return pa.table(cols).replace_schema_metadata({META_KEY: json.dumps(meta, ensure_ascii=False)})


def read_values(path: Path) -> tuple[ValueResult, dict]:
    """The ValueResult (without trace) and the metadata (prefixes, ...) of a keys_values.parquet
    (of a one-pass method; :func:`read_passes` reads every pass)."""
    passes, meta = read_passes(path)
    return passes[0], meta


def read_passes(path: Path) -> tuple[list[ValueResult], dict]:
    """Every pass's ValueResult (without trace) and the metadata of a keys_values.parquet."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[META_KEY])
    dtype = getattr(torch, meta["dtype"])
    df = table.to_pandas()
    if "pass" not in df:
        df["pass"] = 0
    passes = []
    for k in sorted(df["pass"].unique()):
        out: dict[str, dict[str, torch.Tensor]] = {"target": {}, "init": {}, "delta": {}}
        steps = None
        for site in meta["sites"]:
            part = df[(df["site"] == site) & (df["pass"] == k)].sort_values("request")
            if part.empty:
                continue
            for name in out:
                out[name][site] = torch.from_numpy(np.stack(part[name].to_numpy()).astype(np.float32)).to(dtype)
            steps = torch.tensor(part["steps"].to_numpy(), dtype=torch.long)
        passes.append(ValueResult(out["target"], out["init"], out["delta"], steps, []))
    return passes, meta


def run(batch_dir: str | Path) -> dict:
    eb = open_edit_batch(batch_dir, "keys_values")
    atomic.remove_stale_temps(eb.dir)  # of an attempt that was killed mid-write
    model, tok, hp = eb.lm.model, eb.lm.tokenizer, eb.hp
    timings = {"materialize_s": eb.materialize_s}
    validate_inputs(model, tok, eb.requests, eb.spec, hp)
    torch.manual_seed(eb.batch.seed)
    t0 = time.perf_counter()
    prefixes = context_prefixes(model, tok, hp)
    timings["prefixes_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    chosen = select_neighbors(model, tok, eb.requests, hp.neighbors) if hp.neighbors else None
    nbs = chosen.prompts if chosen else None
    extra = {"editing_neighbors": chosen.indices} if chosen else {}
    adapter = adapter_for(model)
    if eb.spec.joint and not hp.iterative:
        values = [compute_targets(model, tok, adapter, eb.requests, prefixes, eb.spec, hp, eb.batch.engine, neighbors=nbs,
                                  progress=True)]
    else:  # optimisation and spread interleave: run them all (the apply stage replays the spreads)
        from pipeline.stages.apply import cached_covariances
        from pipeline.stages.common import needed_covariances

        covs, _ = cached_covariances(eb.project, eb.lm, needed_covariances(eb.spec, hp), hp)
        run = run_edit(model, tok, adapter, eb.requests, prefixes, eb.spec, hp, covs, apply=False,
                       engine=eb.batch.engine, neighbors=chosen)
        values = run.values
        extra["iterations"] = run.iterations
    timings["values_s"] = time.perf_counter() - t0
    atomic.write_parquet(eb.dir / KV_FILE, values_table(values, prefixes, hp.layers[-1], timings, extra))
    atomic.write_parquet(eb.dir / TRACE_FILE, pd.DataFrame([row for v in values for row in v.trace]))
    return {"requests": len(eb.requests), "steps": sum(v.steps for v in values).tolist(), **timings}
