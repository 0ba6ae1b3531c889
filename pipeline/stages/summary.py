"""Stage ``summary`` (and ``editledger log`` / ``report``): the history of the ledger, one row per batch.

:func:`ledger_table` — one row per batch directory, committed or not: sequence, directory, entry
id, kind, method, its modifiers (``+iterative``, ``+na1`` …), number of requests, status, whether
it is active now, the number of requests active after it, its evaluation (``base_``: the unedited
model, ``pre_``: the parent state, ``post_``: this state — on the batch's own requests; ``ret_``:
this state on the retained earlier edits; ``ppl``: ME-PPL-50 perplexity) and the norm of its weight
change per layer.  Status is
``committed``, ``refused`` (committed, but the collapse guard kept it out of the state),
``pending`` (not computed yet), ``interrupted`` (an apply died before its commit
point), ``changed`` (its inputs were edited after it was applied) or ``stale`` (an earlier batch
is pending or changed) — ``dvc repro -P`` recomputes both — ``invalid`` (fails its checks: run
``editledger verify``), ``unverified`` (after an invalid one) or ``superseded`` (re-appended
elsewhere by ``editledger rebase``: history, off the main line, listed after the main line).

:func:`history_table` puts the unedited model in front as row 0 (``seq`` 0, kind ``base``): its
``post_`` numbers are the ``base_`` numbers of all evaluated batches pooled (weighted by their
number of requests) and its ``ppl`` is the unedited perplexity, so every curve starts at its
baseline.  The stage writes that table as Parquet, a CSV for ``dvc plots`` (``history.csv``),
headline numbers for ``dvc metrics`` (``summary.json``) and the HTML report.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd

from pipeline.editing.hparams import HParams
from pipeline.evaluation.names import CONSISTENCY_KEY
from pipeline.ledger import atomic
from pipeline.ledger.batch import BatchError, read_batch
from pipeline.ledger.errors import LedgerCorruptError, LedgerError
from pipeline.ledger.layout import (INDEX_FILE, REQUESTS_FILE, STATE_FILE, EntryDir, layer_of, scan, scan_all,
                                    split_lines)
from pipeline.ledger.store import BeforeCheckpointError, read_evaluation, walk

HEADLINE = ("efficacy", "generalization", "specificity", "score")
METRICS = (*HEADLINE, *(f"{m}_{q}" for q in ("magnitude", "accuracy") for m in HEADLINE[:3]), "fluency",
           CONSISTENCY_KEY)
PHASES = ("base", "pre", "post", "ret")
COLUMNS = ["seq", "dir", "id", "kind", "method", "modifiers", "protocol", "n_requests", "n_active_requests", "status",
           "active", "approximate", "target", "mode", "reapplies", "created_at", "edit_s", "ppl_base", "ppl",
           "retention_mode", "retention_n", "retention_available", "delta_norm", "max_weight_norm_ratio",
           "min_projector_rank", "guard_ratio"] + [
           f"{p}_{m}" for p in PHASES for m in METRICS]
# what `dvc plots` draws (root dvc.yaml) and the HTML report's curves read
PLOT_COLUMNS = ["seq", "dir", "kind", "n_active_requests", *(f"post_{m}" for m in METRICS),
                *(f"ret_{m}" for m in METRICS), "ppl", "max_weight_norm_ratio", "min_projector_rank", "guard_ratio"]


def _evaluation_columns(ev: dict | None) -> dict:
    if not ev:
        return {}
    row = {f"{p}_{m}": ev.get(p, {}).get(m) for p in ("base", "pre", "post") for m in METRICS}
    row["protocol"] = ev.get("protocol")
    ret = ev.get("retention")
    if ret:
        groups = ret.get("metrics") or {}
        own = groups.get(ev.get("protocol")) or (next(iter(groups.values())) if len(groups) == 1 else {})
        row.update({f"ret_{m}": own.get(m) for m in METRICS})
        row.update(retention_mode=ret.get("mode"), retention_n=ret.get("n_evaluated"),
                   retention_available=ret.get("n_available"))
    ppl = ev.get("perplexity") or {}
    row.update(ppl_base=ppl.get("base"), ppl=ppl.get("post"))
    return row


def _delta_columns(manifest: dict) -> dict:
    """Frobenius norm of the entry's own weight change, in total and per layer (from the manifest)."""
    params = (manifest.get("deltas") or {}).get("params") or {}
    if not params:
        return {}
    layers: dict[str, float] = {}
    for name, info in params.items():
        layers[layer_of(name)] = layers.get(layer_of(name), 0.0) + info["norm"] ** 2
    out = {f"delta_norm_layer_{k}": math.sqrt(v) for k, v in layers.items()}
    out["delta_norm"] = math.sqrt(sum(layers.values()))
    return out


def _health_columns(manifest: dict) -> dict:
    """The apply stage's health record: the largest ‖W‖/‖W₀‖ over the edited matrices of the state
    the batch made, the smallest null-space projector rank, and the collapse guard's perplexity ratio."""
    metrics = manifest.get("metrics") or {}
    health, guard = metrics.get("health") or {}, metrics.get("guard") or {}
    ranks = (health.get("projector_rank") or {}).values()
    return {"max_weight_norm_ratio": health.get("max_weight_norm_ratio"), "min_projector_rank": min(ranks, default=None),
            "guard_ratio": guard.get("ratio")}


def _read_chain(ledger: Path, since_checkpoint: bool) -> tuple[dict, set, dict, pd.DataFrame | None,
                                                                LedgerError | None]:
    committed, active, n_active, sizes, index, problem = {}, set(), {}, {}, None, None
    try:
        for e, state in walk(ledger, missing_ok=True, since_checkpoint=since_checkpoint):
            if since_checkpoint and not committed and e.kind == "checkpoint":
                index = pd.read_parquet(e.path / INDEX_FILE)
                sizes.update(zip(index["id"], index["n_requests"].fillna(0).astype(int)))
            committed[e.dirname] = e
            sizes[e.id] = len(e.requests) if e.kind == "edit" else 0
            active = set(state.active)
            n_active[e.dirname] = sum(sizes.get(i, 0) for i in state.active)
    except LedgerError as exc:
        if isinstance(exc, BeforeCheckpointError):
            raise
        problem = exc
    return committed, active, n_active, index, problem


def _chain_columns(ledger: Path) -> tuple[dict, set, dict, pd.DataFrame | None, LedgerError | None]:
    """From the last checkpoint on (the whole chain when an entry refers to one before it): the
    committed entries by directory, the active ids now, requests active after each entry, the
    checkpoint's table of the batches before it, and the first problem met (rows after it are
    marked, not dropped)."""
    try:
        return _read_chain(ledger, since_checkpoint=True)
    except BeforeCheckpointError:
        return _read_chain(ledger, since_checkpoint=False)


def ledger_table(ledger_dir: str | Path, *, before_seq: int | None = None) -> pd.DataFrame:
    """One row per batch directory, in sequence order (see the module docstring); the main line's
    rows stop before ``before_seq`` (a checkpoint's own table).  The batches a checkpoint seals come
    from its table, so the cost follows the batches since the last checkpoint, not the history."""
    ledger = Path(ledger_dir)
    committed, active, n_active, index, problem = _chain_columns(ledger)
    main = scan(ledger, missing_ok=True)
    rows = []
    for d in main[0 if index is None else len(index[index["status"] != "superseded"]):]:
        if before_seq is not None and d.seq >= before_seq:
            break
        row = _batch_row(d)
        e = committed.get(d.name)
        if e is not None:
            row.update(id=e.id, active=e.id in active, approximate=e.approximate, created_at=e.manifest["created_at"],
                       edit_s=sum(e.manifest["timings"].values()), n_active_requests=n_active[d.name],
                       status=e.manifest["status"])
            row.update(_delta_columns(e.manifest), **_health_columns(e.manifest))
            try:
                row.update(_evaluation_columns(read_evaluation(e)))
            except LedgerCorruptError:
                row["status"] = "invalid"
        elif d.committed:
            row["status"] = _broken(problem, d.name)
        rows.append(row)
    sealed = set(index["dir"]) if index is not None else set()
    for d in split_lines(scan_all(ledger, missing_ok=True))[1]:
        if d.name not in sealed:
            row = _batch_row(d)
            row.update(status="superseded", active=False, **_superseded_manifest(d))
            rows.append(row)
    layers = {k for r in rows for k in r if k.startswith("delta_norm_layer_")}
    if index is not None:
        layers |= {c for c in index.columns if c.startswith("delta_norm_layer_")}
    layers = sorted(layers, key=lambda k: (not k[17:].isdigit(), int(k[17:]) if k[17:].isdigit() else 0, k))
    df = pd.DataFrame(rows, columns=COLUMNS + layers)
    if index is not None:  # the sealed batches, as the checkpoint recorded them; active as of now
        old = index.reindex(columns=COLUMNS + layers).astype(object)
        old["active"] = [i in active if s != "superseded" else False for i, s in zip(old["id"], old["status"])]
        df = pd.concat([old[old["status"] != "superseded"], df.astype(object), old[old["status"] == "superseded"]],
                       ignore_index=True)
        df = df.sort_values("status", key=lambda col: col == "superseded", kind="stable", ignore_index=True)
        df = df.infer_objects()
    for col in ("n_requests", "n_active_requests", "retention_n", "retention_available", "min_projector_rank"):
        df[col] = df[col].astype("Int64")
    return df


def parquet_bytes(df: pd.DataFrame) -> bytes:
    """A table as Parquet bytes (a checkpoint's index is written by the ledger, atomically)."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def _batch_row(d: EntryDir) -> dict:
    """The columns a batch directory's add-time inputs give (``invalid`` when they are unreadable)."""
    row = dict.fromkeys(COLUMNS)
    row.update(seq=d.seq, dir=d.name, status=d.status)
    try:
        b = read_batch(d.path)
        row.update(kind=b.kind, method=b.method, target=b.target, mode=b.mode, reapplies=b.reapplies)
        if b.kind == "edit":
            row["modifiers"] = HParams.label_of(b.hparams)
            row["n_requests"] = len(pd.read_parquet(d.path / REQUESTS_FILE, columns=["index"]))
    except (BatchError, OSError, ValueError):
        row["status"] = "invalid"
    return row


def _superseded_manifest(d: EntryDir) -> dict:
    """Id and time of a superseded batch's entry, if it was ever computed (``verify`` checks it)."""
    try:
        m = json.loads((d.path / STATE_FILE).read_text(encoding="utf-8"))
        return {"id": m["id"], "created_at": m["created_at"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _broken(problem: LedgerError | None, name: str) -> str:
    """Status of a committed batch at or after the first entry that failed to load."""
    reason = getattr(problem, "reason", str(problem))
    kind = "stale" if "stale" in reason else "changed" if "inputs changed" in reason else "invalid"
    if getattr(problem, "dirname", None) == name:
        return kind
    return "unverified" if kind == "invalid" else "stale"


def _pooled(df: pd.DataFrame, column: str) -> float | None:
    """Mean of ``column`` over the rows that have it, weighted by their number of requests."""
    have = df[df[column].notna() & df["n_requests"].notna()]
    if have.empty:
        return None
    w = have["n_requests"].astype(float)
    return float((have[column].astype(float) * w).sum() / w.sum())


def history_table(ledger: pd.DataFrame) -> pd.DataFrame:
    """Row 0 (the unedited model, see the module docstring) followed by the ledger's rows."""
    evaluated = ledger[(ledger["kind"] == "edit") & ledger["post_efficacy"].notna()]
    base = dict.fromkeys(ledger.columns)
    base.update(seq=0, dir="base", kind="base", status="base", n_active_requests=0,
                n_requests=int(evaluated["n_requests"].sum()) if len(evaluated) else 0)
    protocols = set(evaluated["protocol"].dropna())
    base["protocol"] = protocols.pop() if len(protocols) == 1 else None
    for m in METRICS:
        base[f"base_{m}"] = base[f"post_{m}"] = _pooled(evaluated, f"base_{m}")
    ppl = evaluated["ppl_base"].dropna()
    base["ppl"] = base["ppl_base"] = float(ppl.iloc[0]) if len(ppl) else None
    keep = {c: t for c, t in ledger.dtypes.items() if t != bool}  # row 0 has no "active": None, not False
    return pd.concat([pd.DataFrame([base]).astype(keep), ledger], ignore_index=True)


def _clean(d: dict) -> dict:
    """Plain JSON values (numpy scalars → Python), without the missing ones."""
    d = {k: v.item() if hasattr(v, "item") else v for k, v in d.items()}
    return {k: v for k, v in d.items() if v is not None and v is not pd.NA
            and not (isinstance(v, float) and math.isnan(v))}


def summary_metrics(history: pd.DataFrame) -> dict:
    """Headline numbers for ``dvc metrics show/diff``: counts, the unedited model (``base``), the
    last evaluated batch (``last``: its own requests, the retained ones, perplexity), and the
    post-edit metrics of the active batches pooled (``active_post``)."""
    df = history[(history["kind"] != "base") & (history["status"] != "superseded")]
    edits = df[(df["kind"] == "edit") & (df["active"] == True)]  # noqa: E712  (nullable column)
    out = {"batches": int(len(df)), "committed": int((df["status"] == "committed").sum()),
           "refused": int((df["status"] == "refused").sum()),
           "active_batches": int(len(edits)),
           "active_requests": int(edits["n_requests"].fillna(0).sum()),
           "approximate": bool(df["approximate"].fillna(False).iloc[-1]) if len(df) else False}
    row0 = history[history["kind"] == "base"]
    if len(row0) and pd.notna(row0["post_efficacy"].iloc[0]):
        r = row0.iloc[0]
        out["base"] = _clean({**{m: r[f"post_{m}"] for m in METRICS}, "ppl": r["ppl"]})
    evaluated = df[(df["kind"] == "edit") & df["post_efficacy"].notna()]
    if len(evaluated):
        r = evaluated.iloc[-1]
        out["last"] = _clean({"seq": int(r["seq"]), "n_active_requests": r["n_active_requests"], "ppl": r["ppl"],
                              **{f"post_{m}": r[f"post_{m}"] for m in METRICS},
                              **{f"ret_{m}": r[f"ret_{m}"] for m in METRICS}})
    active = edits.dropna(subset=["post_efficacy"])
    if len(active):
        out["active_base"] = _clean({m: _pooled(active, f"base_{m}") for m in METRICS})
        out["active_post"] = _clean({m: _pooled(active, f"post_{m}") for m in METRICS})
    return out


def summary_lines(metrics: dict) -> list[str]:
    """:func:`summary_metrics` as a person reads it at a glance: what is active, how the active edits
    do on the unedited model and right after their batch, how the latest state keeps the earlier
    edits, and whether the model is still healthy (ME-PPL-50)."""
    def arrow(a: dict, b: dict, keys=("efficacy", "generalization", "specificity")) -> str:
        return "  ".join(f"{k} {a[k]:.3f} → {b[k]:.3f}" for k in keys if k in a and k in b)

    lines = [f"{metrics['batches']} batches ({metrics['committed']} committed, {metrics['refused']} refused by the "
             f"collapse guard), {metrics['active_requests']} edits active in {metrics['active_batches']} batches"
             + ("  [approximate state: a fast drop]" if metrics.get("approximate") else "")]
    if "active_post" in metrics:
        lines.append(f"  active edits, unedited → after their batch:  {arrow(metrics['active_base'], metrics['active_post'])}")
    last = metrics.get("last", {})
    if "ret_efficacy" in last:
        lines.append(f"  earlier edits kept after batch {last['seq']}:  " +
                     "  ".join(f"{k} {last[f'ret_{k}']:.3f}" for k in ("efficacy", "generalization", "specificity")
                               if f"ret_{k}" in last))
    if "ppl" in metrics.get("base", {}) and "ppl" in last:
        lines.append(f"  ME-PPL-50 (collapse check): {metrics['base']['ppl']:.1f} unedited → {last['ppl']:.1f} now "
                     f"({last['ppl'] / metrics['base']['ppl']:.2f}×)")
    return lines


def latest_settings(ledger_dir: str | Path, history: pd.DataFrame) -> dict | None:
    """The evaluation settings recorded by the last evaluated batch (for the report's notes)."""
    from pipeline.ledger.store import entries

    evaluated = history[(history["kind"] == "edit") & history["post_efficacy"].notna()]
    if evaluated.empty:
        return None
    last = evaluated["dir"].iloc[-1]
    try:
        ev = read_evaluation(next(e for e in entries(ledger_dir) if e.dirname == last))
    except (LedgerError, StopIteration):
        return None
    return {k: ev.get(k) for k in ("retention", "generation", "perplexity", "protocol")} if ev else None


def write_summary(ledger_dir: str | Path, out_dir: Path, *, page_name: str = "index.html") -> dict:
    """Write ``summary.parquet``, ``summary.json``, ``history.csv`` and the HTML report into ``out_dir``."""
    from pipeline.report.page import html_page

    history = history_table(ledger_table(ledger_dir))
    metrics = summary_metrics(history)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_parquet(out_dir / "summary.parquet", history)
    atomic.write_text(out_dir / "summary.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    atomic.write_text(out_dir / "history.csv", history[PLOT_COLUMNS].to_csv(index=False, float_format="%.6g"))
    atomic.write_text(out_dir / page_name, html_page(history, metrics, latest_settings(ledger_dir, history),
                                                     batch_requests(ledger_dir)))
    return metrics


def batch_requests(ledger_dir: str | Path) -> dict[str, list[dict]]:
    """Batch directory → its canonical requests (from the add-time ``requests.parquet``), for the
    report's links from each batch to what it asked for."""
    out = {}
    for d in scan_all(ledger_dir, missing_ok=True):
        try:
            out[d.name] = [json.loads(x) for x in pd.read_parquet(d.path / REQUESTS_FILE, columns=["canonical"])["canonical"]]
        except (OSError, ValueError, KeyError):
            continue  # a revert or drop has none; an unreadable one is `verify`'s to report
    return out
