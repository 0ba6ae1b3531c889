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
from pipeline.editing.values import ValueResult
from pipeline.ledger import atomic
from pipeline.ledger.layout import KV_FILE, TRACE_FILE
from pipeline.models.adapters import adapter_for
from pipeline.stages.common import open_edit_batch

META_KEY = b"editledger"


def values_table(values: ValueResult, prefixes: list[str], layer: int, timings: dict) -> pa.Table:
    rows: dict[str, list] = {"request": [], "site": [], "steps": []}
    vectors: dict[str, list] = {"target": [], "init": [], "delta": []}
    for site in values.targets:
        for i in range(values.targets[site].shape[0]):
            rows["request"].append(i)
            rows["site"].append(site)
            rows["steps"].append(int(values.steps[i]))
            for name, src in (("target", values.targets), ("init", values.init), ("delta", values.deltas)):
                vectors[name].append(src[site][i].detach().float().cpu().numpy())
    dim = len(vectors["target"][0])
    cols = {k: pa.array(v, pa.int32() if k != "site" else pa.string()) for k, v in rows.items()}
    for name, vecs in vectors.items():
        cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(np.stack(vecs).reshape(-1), pa.float32()), dim)
    meta = {"prefixes": prefixes, "layer": layer, "sites": list(values.targets),
            "dtype": str(next(iter(values.targets.values())).dtype).replace("torch.", ""), "timings": timings}
    return pa.table(cols).replace_schema_metadata({META_KEY: json.dumps(meta, ensure_ascii=False)})


def read_values(path: Path) -> tuple[ValueResult, dict]:
    """The ValueResult (without trace) and the metadata (prefixes, ...) of a keys_values.parquet."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[META_KEY])
    dtype = getattr(torch, meta["dtype"])
    df = table.to_pandas()
    out: dict[str, dict[str, torch.Tensor]] = {"target": {}, "init": {}, "delta": {}}
    steps = None
    for site in meta["sites"]:
        part = df[df["site"] == site].sort_values("request")
        for name in out:
            out[name][site] = torch.from_numpy(np.stack(part[name].to_numpy()).astype(np.float32)).to(dtype)
        steps = torch.tensor(part["steps"].to_numpy(), dtype=torch.long)
    return ValueResult(out["target"], out["init"], out["delta"], steps, []), meta


def run(batch_dir: str | Path) -> dict:
    eb = open_edit_batch(batch_dir, "keys_values")
    model, tok, hp = eb.lm.model, eb.lm.tokenizer, eb.hp
    timings = {"materialize_s": eb.materialize_s}
    validate_inputs(model, tok, eb.requests, eb.spec, hp)
    torch.manual_seed(eb.batch.seed)
    t0 = time.perf_counter()
    prefixes = context_prefixes(model, tok, hp)
    timings["prefixes_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    values = compute_targets(model, tok, adapter_for(model), eb.requests, prefixes, eb.spec, hp, eb.batch.engine,
                             progress=True)
    timings["values_s"] = time.perf_counter() - t0
    atomic.write_parquet(eb.dir / KV_FILE, values_table(values, prefixes, hp.layers[-1], timings))
    atomic.write_parquet(eb.dir / TRACE_FILE, pd.DataFrame(values.trace))
    return {"requests": len(eb.requests), "steps": values.steps.tolist(), **timings}
