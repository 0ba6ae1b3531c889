"""Does the evaluation code in this checkout give the numbers another version gave?  (issue 21)

Takes a DVC project whose ledger was evaluated by some version of editledger (e.g. the main job run
from a clone of an earlier commit), copies it (the model, data and DVC cache hard-linked, the ledger
and DVC's files copied), runs ``dvc repro -f`` of every batch's ``evaluate`` stage in the copy with
*this* checkout's code and the evaluation cache off (every number computed, none read back), and compares every number of each ``metrics.json`` (timings aside) and every
row of each ``eval.parquet`` with the originals: which are bit-identical, the largest difference of
the others, whether they are equal at the precision ``editledger log`` and ``report`` print (3
decimals), whether any success flipped or any generated text changed; and the stage's time before
and after.  The project itself is not changed.

    python benchmarks/eval_identity.py ../before       # → benchmarks/results/eval_identity.json
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import typer

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"timings", "digest", "files", "schema", "dir", "entry"}  # not metrics: where and when, not what
PRINTED = 3  # decimals of the metrics `editledger log` and `report` print


def leaves(doc, prefix: str = "") -> dict[str, float]:
    """Every number of a metrics document by its dotted path (timings and bookkeeping left out)."""
    out: dict[str, float] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k not in SKIP:
                out.update(leaves(v, f"{prefix}{k}."))
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        out[prefix[:-1]] = float(doc)
    return out


def compare_metrics(old: dict, new: dict) -> dict:
    a, b = leaves(old), leaves(new)
    if a.keys() != b.keys():
        return {"same_keys": False, "only_before": sorted(a.keys() - b.keys()), "only_after": sorted(b.keys() - a.keys())}
    differ = {k: abs(a[k] - b[k]) for k in a if not (a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])))}
    printed = [k for k in differ if round(a[k], PRINTED) != round(b[k], PRINTED)]
    return {"same_keys": True, "numbers": len(a), "bit_identical": len(a) - len(differ),
            "differ": {k: {"before": a[k], "after": b[k], "abs_diff": d} for k, d in sorted(differ.items())},
            "max_abs_diff": max(differ.values(), default=0.0), "differ_at_printed_precision": printed}


def compare_rows(old: pd.DataFrame, new: pd.DataFrame) -> dict:
    """Per prompt and state: success flips, changed generations, the largest log-probability change."""
    key = ["phase", "batch", "request", "kind", "prompt", "occurrence"]  # a record may repeat a prompt
    old, new = (df.assign(occurrence=df.groupby(key[:-1], dropna=False).cumcount()) for df in (old, new))
    m = old.merge(new, on=key, suffixes=("_before", "_after"), how="outer", indicator=True)
    out = {"rows_before": len(old), "rows_after": len(new), "unmatched": int((m["_merge"] != "both").sum())}
    m = m[m["_merge"] == "both"]
    if "success_before" in m:
        s = m.dropna(subset=["success_before", "success_after"])
        out["success_flips"] = int((s["success_before"].astype(bool) != s["success_after"].astype(bool)).sum())
    if "generation_before" in m:
        g = m.dropna(subset=["generation_before"])
        out["generations"] = len(g)
        out["generations_changed"] = int((g["generation_before"] != g["generation_after"]).sum())
    for col in ("logp_new", "logp_true", "logp"):
        if f"{col}_before" in m:
            d = (m[f"{col}_before"] - m[f"{col}_after"]).abs().dropna()
            out[f"{col}_max_abs_diff"] = float(d.max()) if len(d) else 0.0
            out[f"{col}_bit_identical"] = int((d == 0).sum())
            out[f"{col}_compared"] = len(d)
    return out


def hardlinked_copy(src: Path, dst: Path) -> None:
    """The model, data and DVC cache as hard links (large, read-only); everything DVC or a stage may
    rewrite in place (the ledger, dvc.yaml/lock, params, reports) as real copies."""
    def copy(s: str, d: str) -> None:
        rel = Path(s).relative_to(src)
        if rel.parts[0] in ("data", ".dvc") and rel.parts[:2] != (".dvc", "tmp"):
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, symlinks=True, copy_function=copy, ignore=shutil.ignore_patterns(".venv", ".git"))
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)  # DVC wants a repository (nothing is committed)


def main(project: Path, out: Path = ROOT / "benchmarks" / "results" / "eval_identity.json"):
    project = project.resolve()
    batches = sorted(p for p in (project / "ledger").iterdir() if (p / "metrics.json").exists())
    if not batches:
        raise typer.BadParameter(f"{project}/ledger has no evaluated batch")
    result: dict = {"project": str(project), "code": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                                                   capture_output=True, text=True).stdout.strip(),
                    "batches": {}}
    with tempfile.TemporaryDirectory(dir=project.parent) as tmp:
        copy = Path(tmp) / project.name
        hardlinked_copy(project, copy)
        # the evaluation cache off: every number is computed by this code, none read back
        env = {**os.environ, "EDITLEDGER_EVAL_CACHE": "off",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # this venv's dvc
        for b in batches:
            stage = f"ledger/{b.name}/dvc.yaml:evaluate"
            done = subprocess.run(["dvc", "repro", "-f", "-s", stage], cwd=copy, capture_output=True, text=True, env=env)
            if done.returncode:
                raise SystemExit(f"error: dvc repro -f -s {stage} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
            old, new = (json.loads((p / "ledger" / b.name / "metrics.json").read_text()) for p in (project, copy))
            rows = compare_rows(*(pd.read_parquet(p / "ledger" / b.name / "eval.parquet") for p in (project, copy)))
            result["batches"][b.name] = {"metrics": compare_metrics(old, new), "rows": rows,
                                         "seconds_before": old.get("timings"), "seconds_after": new.get("timings")}
            m = result["batches"][b.name]["metrics"]
            print(f"{b.name}: {m.get('bit_identical')}/{m.get('numbers')} numbers bit-identical, max |Δ| "
                  f"{m.get('max_abs_diff', float('nan')):.2g}, {len(m.get('differ_at_printed_precision', []))} differ "
                  f"at {PRINTED} decimals; success flips {rows.get('success_flips')}, generations changed "
                  f"{rows.get('generations_changed')}/{rows.get('generations')}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    typer.run(main)
