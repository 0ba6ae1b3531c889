"""The evaluation suite: every metric of one model state on a set of requests, with its settings.

Per state and request set: the teacher-forced protocol (CounterFact or zsRE, :mod:`protocols`),
and for CounterFact records with ``generation_prompts`` the generation metrics — fluency
(:mod:`fluency`) and consistency (:mod:`consistency`) — from deterministic samples
(:mod:`generation`).  The evaluate stage calls it for the unedited model, the state before and
after a batch, and the retained earlier edits; the baseline benchmark calls it directly.

Consistency reference.  The canonical Wikipedia snippets and IDF table are not available, so the
reference of a record is its own ``attribute_prompts`` (prompts about *other* subjects whose true
object is the new one: "J. R. R. Tolkien is a native speaker of") each completed with ``o*``, and
the IDF is fitted on the WikiText-2 test sample (one document per paragraph line).  The metric is
named :data:`CONSISTENCY_KEY` so that it is never read as the papers' "reference score".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from pipeline.requests import EditRequest
from pipeline.evaluation.consistency import Tfidf
from pipeline.evaluation.fluency import fluency, ngram_entropy
from pipeline.evaluation.generation import DecodingSettings, generate
from pipeline.evaluation.protocols import evaluate, protocol_of
from pipeline.evaluation.names import CONSISTENCY_KEY
from pipeline.evaluation.retention import RetentionSettings

CONSISTENCY_REFERENCE = {
    "metric": CONSISTENCY_KEY,
    "reference": "the record's CounterFact attribute_prompts, each completed with target_new",
    "idf": "WikiText-2 test sample, one document per line (data/wikitext/wikitext2_raw_test.txt)",
    "vectoriser": "scikit-learn TfidfVectorizer defaults (lower-case, \\b\\w\\w+\\b, smooth idf, l2)",
    "comparable_with_papers": False,
}
GENERATION_METRICS = ("fluency", CONSISTENCY_KEY)


@dataclass(frozen=True)
class EvalSettings:
    """``evaluation:`` of params.yaml (see :func:`pipeline.config.load_params` for the defaults)."""

    generation: DecodingSettings
    retention: RetentionSettings
    ppl_max_length: int = 256

    @classmethod
    def from_params(cls, ev: Mapping[str, Any]) -> EvalSettings:
        seed = ev["seed"]
        return cls(DecodingSettings(**ev["generation"], seed=seed), RetentionSettings(**ev["retention"], seed=seed),
                   ev["perplexity"]["max_length"])


def wikitext_tfidf(path: str | Path) -> Tfidf:
    """The consistency metric's IDF: one document per non-empty line of the WikiText sample."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return Tfidf.fit(line for line in lines if line.strip())


def reference_text(req: EditRequest) -> str | None:
    """The consistency reference of a CounterFact record (see the module docstring), or None."""
    prompts = req.record.get("attribute_prompts") or []
    return " ".join(f"{p} {req.target_new}" for p in prompts) or None


def generation_metrics(model, tok, requests: list[EditRequest], settings: DecodingSettings, tfidf: Tfidf,
                       cache=None) -> tuple[dict, pd.DataFrame]:
    """Fluency and consistency of the requests that have ``generation_prompts`` (per record, then
    averaged over records, as ROME/MEMIT); one Parquet row per generation."""
    rows = []
    for i, r in enumerate(requests):
        for j, prompt in enumerate((r.record.get("generation_prompts") or [])[: settings.prompts_per_record]):
            rows.append({"request": i, "case_id": r.case_id, "kind": "generation", "prompt": prompt,
                         "target_new": r.target_new, "target_true": r.target_true,
                         "key": f"{r.case_id!r}\0{r.subject}\0{r.target_new}\0{j}"})
    if not rows:
        return {}, pd.DataFrame()
    df = pd.DataFrame(rows)
    df["generation"] = generate(model, tok, list(df["prompt"]), list(df["key"]), settings, cache)
    df["ngram_entropy"] = [ngram_entropy(t) for t in df["generation"]]
    per_record = []
    for i, texts in df.groupby("request", sort=True)["generation"]:
        ref = reference_text(requests[i])
        per_record.append((fluency(list(texts)), tfidf.cosine(" ".join(texts), ref) if ref else None))
    cons = [c for _, c in per_record if c is not None]
    metrics = {"fluency": sum(f for f, _ in per_record) / len(per_record),
               CONSISTENCY_KEY: sum(cons) / len(cons) if cons else None, "n_generations": len(df)}
    return metrics, df.drop(columns="key")


def evaluate_state(model, tok, requests: list[EditRequest], settings: DecodingSettings, tfidf: Tfidf | None,
                   editing_neighbors: list[list[int]] | None = None, cache=None) -> tuple[dict, pd.DataFrame]:
    """One protocol's metrics of ``model`` on ``requests`` (all of one protocol); with ``tfidf``
    also the generation metrics (CounterFact only).  ``editing_neighbors``: the neighbourhood
    prompts a neighbour-assisted edit trained on, left out of specificity.  ``cache``: the
    :class:`~pipeline.evaluation.cache.StateCache` of the model's state (None: compute everything)."""
    protocol = {protocol_of(r) for r in requests}
    if len(protocol) != 1 or None in protocol:
        raise ValueError(f"evaluate_state needs requests of one protocol, got {sorted(map(str, protocol))}")
    protocol = protocol.pop()
    metrics, df = evaluate(model, tok, requests, editing_neighbors, cache)
    if tfidf is not None and protocol == "counterfact":
        gen, gdf = generation_metrics(model, tok, requests, settings, tfidf, cache)
        metrics.update(gen)
        df = pd.concat([df, gdf], ignore_index=True) if len(gdf) else df
    return metrics, df


def by_protocol(requests: Iterable[EditRequest]) -> dict[str, list[int]]:
    """Positions of the requests grouped by protocol (retention may span batches of both)."""
    out: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        p = protocol_of(r)
        if p is None:
            raise ValueError(f"request {i} ({r.subject!r}) has no evaluation protocol")
        out.setdefault(p, []).append(i)
    return out
