"""Stage ``summary`` (and ``editledger log`` / ``report``): one row per ledger batch.

Every batch directory gets a row, committed or not: sequence, directory, entry id, kind, method,
number of requests, status, whether it is active now, and its evaluation (pre/post efficacy,
generalisation, specificity, score).  Status is ``committed``, ``refused`` (committed, but the
collapse guard kept it out of the state), ``pending`` (not computed yet),
``interrupted`` (an apply died before its commit point), ``changed`` (its inputs were edited after
it was applied) or ``stale`` (an earlier batch is pending or changed) — ``dvc repro -P`` recomputes
both — ``invalid`` (fails its checks: run ``editledger verify``) or ``unverified`` (after an
invalid one).  Writes Parquet, a DVC metrics JSON and a self-contained HTML table.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from pipeline.ledger import atomic
from pipeline.ledger.batch import BatchError, read_batch
from pipeline.ledger.errors import LedgerCorruptError, LedgerError
from pipeline.ledger.layout import REQUESTS_FILE, scan
from pipeline.ledger.store import read_evaluation, walk

METRICS = ("efficacy", "generalization", "specificity", "score")
COLUMNS = ["seq", "dir", "id", "kind", "method", "n_requests", "status", "active", "approximate", "target", "mode",
           "reapplies", "created_at", "edit_s"] + [f"{p}_{m}" for p in ("pre", "post") for m in METRICS]


def ledger_table(ledger_dir: str | Path) -> pd.DataFrame:
    """One row per batch directory, in sequence order (see the module docstring for ``status``)."""
    ledger = Path(ledger_dir)
    committed, active, problem = {}, set(), None
    try:
        for e, state in walk(ledger, missing_ok=True):
            committed[e.dirname] = e
            active = set(state.active)
    except LedgerError as exc:
        problem = exc
    rows = []
    for d in scan(ledger, missing_ok=True):
        row = dict.fromkeys(COLUMNS)
        row.update(seq=d.seq, dir=d.name, status=d.status)
        try:
            b = read_batch(d.path)
            row.update(kind=b.kind, method=b.method, target=b.target, mode=b.mode, reapplies=b.reapplies)
            if b.kind == "edit":
                row["n_requests"] = len(pd.read_parquet(d.path / REQUESTS_FILE, columns=["index"]))
        except (BatchError, OSError, ValueError):
            row["status"] = "invalid"
        e = committed.get(d.name)
        if e is not None:
            row.update(id=e.id, active=e.id in active, approximate=e.approximate, created_at=e.manifest["created_at"],
                       edit_s=sum(e.manifest["timings"].values()), status=e.manifest["status"])
            try:
                ev = read_evaluation(e)
            except LedgerCorruptError:
                ev, row["status"] = None, "invalid"
            for phase in ("pre", "post"):
                for m in METRICS:
                    row[f"{phase}_{m}"] = (ev or {}).get(phase, {}).get(m)
        elif d.committed:
            row["status"] = _broken(problem, d.name)
        rows.append(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("n_requests",):
        df[col] = df[col].astype("Int64")
    return df


def _broken(problem: LedgerError | None, name: str) -> str:
    """Status of a committed batch at or after the first entry that failed to load."""
    reason = getattr(problem, "reason", str(problem))
    kind = "stale" if "stale" in reason else "changed" if "inputs changed" in reason else "invalid"
    if getattr(problem, "dirname", None) == name:
        return kind
    return "unverified" if kind == "invalid" else "stale"


def summary_metrics(df: pd.DataFrame) -> dict:
    """Headline numbers for ``dvc metrics show``: counts, and the post-edit metrics of active batches."""
    edits = df[(df["kind"] == "edit") & (df["active"] == True)]  # noqa: E712  (nullable column)
    out = {"batches": int(len(df)), "committed": int((df["status"] == "committed").sum()),
           "refused": int((df["status"] == "refused").sum()),
           "active_batches": int(len(edits)),
           "active_requests": int(edits["n_requests"].fillna(0).sum()),
           "approximate": bool(df["approximate"].fillna(False).iloc[-1]) if len(df) else False}
    evaluated = edits.dropna(subset=["post_efficacy"])
    if len(evaluated):
        weights = evaluated["n_requests"].astype(float)
        out["active_post"] = {m: float((evaluated[f"post_{m}"].astype(float) * weights).sum() / weights.sum())
                              for m in METRICS if evaluated[f"post_{m}"].notna().all()}
    return out


def html_page(df: pd.DataFrame, metrics: dict) -> str:
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and v != v) or v is pd.NA:
            return ""
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = "\n".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>"
                     for r in df.astype(object).itertuples(index=False))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>editledger summary</title><style>"
            "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}</style></head><body>"
            "<h1>editledger ledger summary</h1>"
            f"<pre>{html.escape(json.dumps(metrics, indent=2))}</pre>"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table></body></html>\n")


def write_summary(ledger_dir: str | Path, parquet: Path, metrics_json: Path, page: Path) -> dict:
    df = ledger_table(ledger_dir)
    metrics = summary_metrics(df)
    for p in (parquet, metrics_json, page):
        p.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_parquet(parquet, df)
    atomic.write_text(metrics_json, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    atomic.write_text(page, html_page(df, metrics))
    return metrics
