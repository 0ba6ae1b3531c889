"""``keys_values.parquet``: the target values a batch's ``keys_values`` stage found, pass by pass.

One row per (pass, request, site) with the target value, the value before the edit and their
difference as float lists (fixed-size where every site has the same width; JEEP's m^L' and h^L*
differ), and the steps taken; the context prefixes, sites, last low layer, pass count, dtype,
timings and (iterative editing, neighbour-assisted editing) the iterations and the neighbours used,
as JSON in the file's metadata.  Written by the ``keys_values`` stage, read by ``apply`` (the
targets it spreads) and ``evaluate`` (which neighbours were used for editing).

The keys themselves are not stored: the apply stage must recompute them layer by layer anyway,
because a layer's keys change once the layers below it are updated.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.editing.optimise import ValueResult

META_KEY = b"editledger"


def targets_table(passes: list[ValueResult], prefixes: list[str], layer: int, timings: dict,
                  extra_meta: dict | None = None) -> pa.Table:
    """One row per (pass, request, site) of every pass, in order."""
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


def read_targets(path: Path) -> tuple[list[ValueResult], dict]:
    """Every pass's ValueResult (without trace) and the metadata of a keys_values.parquet."""
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
