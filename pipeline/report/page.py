"""The report page: headline numbers beside their baseline, the figures, the history table.

Self-contained on purpose: no script, no stylesheet or font from elsewhere, images as ``data:``
URIs, so the file can be attached to a review, archived with a release, or opened offline.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any, Mapping

import pandas as pd

from pipeline.evaluation.names import CONSISTENCY_KEY
from pipeline.report.plots import FIGURES

TABLE_COLUMNS = ["seq", "dir", "kind", "method", "status", "active", "n_requests", "n_active_requests",
                 "post_efficacy", "post_generalization", "post_specificity", "post_score", "post_fluency",
                 f"post_{CONSISTENCY_KEY}", "ret_efficacy", "ret_generalization", "ret_specificity", "ret_score",
                 "retention_mode", "retention_n", "ppl", "delta_norm"]
HEADLINE = ["efficacy", "generalization", "specificity", "score", "efficacy_magnitude", "generalization_magnitude",
            "specificity_magnitude", "efficacy_accuracy", "generalization_accuracy", "specificity_accuracy",
            "fluency", CONSISTENCY_KEY]
STYLE = ("body{font-family:sans-serif;margin:1.2em;max-width:1250px;color:#222}"
         "table{border-collapse:collapse;font-size:12px;margin:.5em 0}"
         "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}"
         "td.l,th.l{text-align:left}.note{font-size:13px;color:#444;max-width:1000px}"
         "figure{display:inline-block;margin:.5em}img{border:1px solid #ddd}")


def _cell(v: Any) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return html.escape(str(v))


def _img(png: bytes, alt: str) -> str:
    return (f"<figure><img alt='{html.escape(alt)}' src='data:image/png;base64,"
            f"{base64.b64encode(png).decode()}'></figure>")


def _headline(history: pd.DataFrame) -> str:
    base = history[history["kind"] == "base"]
    done = history[(history["kind"] == "edit") & history["post_efficacy"].notna()]
    if done.empty:
        return "<p>No batch has been evaluated yet (<code>dvc repro -P</code>).</p>"
    last, b = done.iloc[-1], base.iloc[0] if len(base) else None
    head = ("<tr><th class=l>metric</th><th>unedited (row 0)</th>"
            f"<th>batch {int(last['seq'])}: its requests, unedited</th><th>after the batch</th>"
            f"<th>retained earlier edits ({_cell(last['retention_mode'])}, n={_cell(last['retention_n'])})</th></tr>")
    rows = [f"<tr><td class=l>{m}</td><td>{_cell(None if b is None else b[f'post_{m}'])}</td>"
            f"<td>{_cell(last[f'base_{m}'])}</td><td>{_cell(last[f'post_{m}'])}</td><td>{_cell(last[f'ret_{m}'])}</td></tr>"
            for m in HEADLINE]
    rows.append(f"<tr><td class=l>ME-PPL-50 perplexity</td><td>{_cell(None if b is None else b['ppl'])}</td>"
                f"<td>{_cell(last['ppl_base'])}</td><td>{_cell(last['ppl'])}</td><td></td></tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _notes(settings: dict | None) -> str:
    if not settings:
        return ""
    gen, ret, ppl = settings.get("generation") or {}, settings.get("retention") or {}, settings.get("perplexity") or {}
    cons = gen.get("consistency") or {}
    items = [
        "<b>Row 0</b> is the unedited model: its request metrics pool the unedited evaluation of every batch's "
        "requests (weighted by batch size); every later row is the state right after that batch.",
        f"<b>Retention</b> (dashed curves): after each batch, earlier edits still active are evaluated again — "
        f"mode of the last batch: <code>{html.escape(str(ret.get('mode')))}</code>, {ret.get('n_evaluated')} of "
        f"{ret.get('n_available')} requests (settings: sample={ret.get('sample')}, full_every="
        f"{ret.get('full_every')}, seed={ret.get('seed')}).",
        f"<b>Generation</b> (fluency, consistency): {html.escape(str(gen.get('strategy')))}, top-k "
        f"{gen.get('top_k')}, {gen.get('max_new_tokens')} new tokens, first {gen.get('prompts_per_record')} "
        f"generation prompts per record, seed {gen.get('seed')}.  Fluency = mean(2/3·H₂, 4/3·H₃) of word n-grams "
        "(bits), as ROME/MEMIT (regex word split instead of NLTK).",
        f"<b>{html.escape(str(cons.get('metric', CONSISTENCY_KEY)))}</b> is <b>not comparable</b> with the "
        f"papers' consistency: reference = {html.escape(str(cons.get('reference')))}; IDF = "
        f"{html.escape(str(cons.get('idf')))}.",
        f"<b>Collapse</b>: token-level perplexity on {html.escape(str(ppl.get('dataset')))} "
        f"({ppl.get('n_texts')} texts, cut at {ppl.get('max_length')} tokens).",
    ]
    return "<ul class=note>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _row(r: Mapping[str, Any], cols: list[str], requests: Mapping[str, list[dict]]) -> str:
    """A history row; its directory links to the batch's requests (an auditor goes from a plot
    point, labelled with the batch's seq, to this row, to the requests behind it)."""
    cells = []
    for c in cols:
        v = r[c]
        if c == "dir" and v in requests:
            cells.append(f"<td class=l><a href='#requests-{html.escape(str(v))}'>{_cell(v)}</a></td>")
        else:
            cells.append(f"<td>{_cell(v)}</td>")
    return f"<tr id='batch-{html.escape(str(r['dir']))}'>" + "".join(cells) + "</tr>"


def _requests_section(requests: Mapping[str, list[dict]]) -> str:
    """One table per batch: the canonical requests it asked for, each a fact and its new object."""
    if not requests:
        return ""
    parts = ["<h2>Requests per batch</h2>"]
    for d, reqs in requests.items():
        rows = "".join(f"<tr><td class=l>{html.escape(str(q['prompt']).replace('{}', str(q['subject'])))}</td>"
                       f"<td class=l>{_cell(q.get('target_true'))}</td><td class=l>{_cell(q['target_new'])}</td>"
                       f"<td class=l>{_cell(q.get('relation_id'))}</td><td>{_cell(q.get('case_id'))}</td></tr>"
                       for q in reqs)
        parts.append(f"<h3 id='requests-{html.escape(d)}'><a href='#batch-{html.escape(d)}'>{html.escape(d)}</a>: "
                     f"{len(reqs)} request(s)</h3><table><thead><tr><th class=l>fact</th><th class=l>was</th>"
                     f"<th class=l>requested</th><th class=l>relation</th><th>case</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table>")
    return "".join(parts)


def html_page(history: pd.DataFrame, metrics: dict, settings: dict | None,
              requests: Mapping[str, list[dict]] | None = None) -> str:
    """The page; ``requests`` (batch directory → its canonical requests) links each batch to them."""
    requests = requests or {}
    cols = [c for c in TABLE_COLUMNS if c in history.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "\n".join(_row(r, cols, requests) for r in history[cols].astype(object).to_dict("records"))
    figures = "".join(_img(fn(history), title) for title, fn in FIGURES)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>editledger history report</title>"
            f"<style>{STYLE}</style></head><body>"
            "<h1>editledger history report</h1>"
            f"<p>{metrics.get('batches', 0)} batches, {metrics.get('committed', 0)} committed, "
            f"{metrics.get('active_requests', 0)} requests in {metrics.get('active_batches', 0)} active batches"
            f"{' (approximate state: a fast drop)' if metrics.get('approximate') else ''}.</p>"
            f"<h2>Last evaluated batch beside its baselines</h2>{_headline(history)}{_notes(settings)}"
            f"<h2>History</h2>{figures}"
            f"<h2>All batches</h2><table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"
            f"{_requests_section(requests)}"
            "<p class=note>Every column (magnitudes, accuracies, per-layer norms, timings) is in "
            "<code>summary.parquet</code>; per-prompt results in each batch's <code>eval.parquet</code>.</p>"
            f"<details><summary>summary.json</summary><pre>{html.escape(json.dumps(metrics, indent=2))}</pre>"
            "</details></body></html>\n")
