"""The CounterFact and zsRE evaluation protocols (MEMIT's definitions).

CounterFact: on the rewrite prompt (efficacy) and paraphrase prompts (generalisation) an edit
succeeds when P[new] > P[true]; on neighbourhood prompts (specificity) when P[true] > P[new],
P being the mean-token teacher-forced probability.  Also magnitudes (P[new] − P[true], resp.
P[true] − P[new]), argmax accuracy, and the score = harmonic mean of the three success rates.
zsRE: teacher-forced top-1 token accuracy of the new answer on the question and its rephrase,
and of the recorded answer on the unrelated NQ question.  Per prompt, the Parquet rows also keep
the probabilities and the rank of the answer's first token (0 = the model's top choice).

Neighbour-assisted editing trains on some neighbourhood prompts of a request; those are not a
fair test of its specificity, so ``editing_neighbors[i]`` (indices into request i's
``neighborhood_prompts``, from ``EditResult.editing_neighbors``) are left out of it.
"""

from __future__ import annotations

import statistics

import pandas as pd

from pipeline.requests import EditRequest
from pipeline.evaluation.scoring import score_pairs


def _harmonic(values: list[float]) -> float:
    return 0.0 if min(values) <= 0 else statistics.harmonic_mean(values)


def counterfact_rows(req: EditRequest, index: int, exclude_neighbors: list[int] | tuple = ()) -> list[dict]:
    rec = req.record
    rows = [{"request": index, "case_id": req.case_id, "kind": "rewrite", "prompt": req.text}]
    rows += [{"request": index, "case_id": req.case_id, "kind": "paraphrase", "prompt": p} for p in rec.get("paraphrase_prompts", [])]
    rows += [{"request": index, "case_id": req.case_id, "kind": "neighborhood", "prompt": p}
             for j, p in enumerate(rec.get("neighborhood_prompts", [])) if j not in set(exclude_neighbors)]
    for r in rows:
        r["target_new"], r["target_true"] = req.target_new, req.target_true
    return rows


def zsre_rows(req: EditRequest, index: int) -> list[dict]:
    rec = req.record
    rows = [{"request": index, "case_id": req.case_id, "kind": "rewrite", "prompt": req.text, "answer": req.target_new}]
    if rec.get("rephrase"):
        rows.append({"request": index, "case_id": req.case_id, "kind": "paraphrase", "prompt": rec["rephrase"], "answer": req.target_new})
    if rec.get("loc") and rec.get("loc_ans"):
        rows.append({"request": index, "case_id": req.case_id, "kind": "neighborhood", "prompt": rec["loc"], "answer": rec["loc_ans"]})
    return rows


def evaluate_counterfact(model, tok, requests: list[EditRequest], editing_neighbors: list[list[int]] | None = None,
                         cache=None) -> tuple[dict, pd.DataFrame]:
    _check_exclusions(requests, editing_neighbors)
    rows = [row for i, r in enumerate(requests)
            for row in counterfact_rows(r, i, editing_neighbors[i] if editing_neighbors else ())]
    if any(r["target_true"] is None for r in rows):
        raise ValueError("CounterFact evaluation needs target_true on every request")
    # one call for both answers: they mostly share the prompt's forward (pipeline.evaluation.scoring)
    both = score_pairs(model, tok, [(r["prompt"], r["target_new"]) for r in rows] +
                       [(r["prompt"], r["target_true"]) for r in rows], cache=cache)
    new, true = both.split(len(rows))
    df = pd.DataFrame(rows)
    df["logp_new"], df["logp_true"] = new.mean_logprob.numpy(), true.mean_logprob.numpy()
    df["p_new"], df["p_true"] = new.mean_prob.numpy(), true.mean_prob.numpy()
    df["argmax_new"], df["argmax_true"] = (new.token_correct == 1).numpy(), (true.token_correct == 1).numpy()
    df["rank_new"], df["rank_true"] = new.first_rank.numpy(), true.first_rank.numpy()
    neigh = df["kind"] == "neighborhood"
    df["success"] = (df["logp_new"] > df["logp_true"]).where(~neigh, df["logp_true"] > df["logp_new"])
    df["magnitude"] = (df["p_new"] - df["p_true"]).where(~neigh, df["p_true"] - df["p_new"])
    df["accuracy"] = df["argmax_new"].where(~neigh, df["argmax_true"])
    metrics = {}
    for kind, name in (("rewrite", "efficacy"), ("paraphrase", "generalization"), ("neighborhood", "specificity")):
        per_req = df[df["kind"] == kind].groupby("request")[["success", "magnitude", "accuracy"]].mean()
        metrics[name] = float(per_req["success"].mean()) if len(per_req) else float("nan")
        metrics[f"{name}_magnitude"] = float(per_req["magnitude"].mean()) if len(per_req) else float("nan")
        metrics[f"{name}_accuracy"] = float(per_req["accuracy"].mean()) if len(per_req) else float("nan")
    metrics["score"] = _harmonic([metrics["efficacy"], metrics["generalization"], metrics["specificity"]])
    metrics["n_requests"] = len(requests)
    return metrics, df


def evaluate_zsre(model, tok, requests: list[EditRequest], cache=None) -> tuple[dict, pd.DataFrame]:
    rows = [row for i, r in enumerate(requests) for row in zsre_rows(r, i)]
    sc = score_pairs(model, tok, [(r["prompt"], r["answer"]) for r in rows], cache=cache)
    df = pd.DataFrame(rows)
    df["logp"], df["token_accuracy"] = sc.mean_logprob.numpy(), sc.token_correct.numpy()
    df["p"], df["rank"] = sc.mean_prob.numpy(), sc.first_rank.numpy()
    df["success"] = df["token_accuracy"] == 1
    metrics = {}
    for kind, name in (("rewrite", "efficacy"), ("paraphrase", "generalization"), ("neighborhood", "specificity")):
        sub = df[df["kind"] == kind]
        metrics[name] = float(sub["token_accuracy"].mean()) if len(sub) else float("nan")
    metrics["score"] = _harmonic([metrics["efficacy"], metrics["generalization"], metrics["specificity"]])
    metrics["n_requests"] = len(requests)
    return metrics, df


def _check_exclusions(requests: list[EditRequest], editing_neighbors: list[list[int]] | None) -> None:
    if editing_neighbors is None:
        return
    if len(editing_neighbors) != len(requests):
        raise ValueError(f"editing_neighbors has {len(editing_neighbors)} entries for {len(requests)} requests")
    for i, (r, idx) in enumerate(zip(requests, editing_neighbors)):
        n = len(r.record.get("neighborhood_prompts", []))
        if any(not isinstance(j, int) or not 0 <= j < n for j in idx):
            raise ValueError(f"editing_neighbors[{i}] = {idx} is out of range for {n} neighbourhood prompts")


def protocol_of(req: EditRequest) -> str | None:
    """``counterfact`` or ``zsre``: which protocol evaluates a request (None: neither applies)."""
    if req.fmt == "counterfact" or req.fmt == "plain" and req.target_true:
        return "counterfact"
    return "zsre" if req.fmt == "zsre" else None


def evaluate(model, tok, requests: list[EditRequest], editing_neighbors: list[list[int]] | None = None,
             cache=None) -> tuple[dict, pd.DataFrame]:
    """Dispatch on the requests' format (all of one batch must share it); ``editing_neighbors``
    (CounterFact only) leaves the neighbour prompts used for editing out of specificity; ``cache``:
    the :class:`~pipeline.evaluation.cache.StateCache` of the model's state."""
    protocols = {protocol_of(r) for r in requests}
    if None in protocols:
        raise ValueError("plain requests without target_true have no evaluation protocol")
    if len(protocols) != 1:
        raise ValueError(f"cannot evaluate a batch mixing formats {sorted({r.fmt for r in requests})}")
    if protocols == {"counterfact"}:
        return evaluate_counterfact(model, tok, requests, editing_neighbors, cache)
    if editing_neighbors is not None:
        raise ValueError("editing_neighbors applies to CounterFact requests only")
    return evaluate_zsre(model, tok, requests, cache)
