"""What a model answers to a fact now, among the objects anyone asked for (``editledger blame``).

One teacher-forced forward per model over every (prompt, candidate object) pair
(:func:`pipeline.evaluation.scoring.score_pairs`): each candidate's probability (exp of its mean
token log-probability, as in the CounterFact magnitudes) and whether its first token is the
model's argmax.  The answer is the candidate the model prefers — a statement about the requested
objects, not free generation, so it is cheap and deterministic.
"""

from __future__ import annotations

import math

from pipeline.evaluation.scoring import score_pairs


def fact_answers(model, tok, facts: dict[str, list[str]]) -> dict[str, dict]:
    """``{prompt: {"answer", "probs": {candidate: p}, "argmax": {candidate: bool}}}`` for each
    filled-in prompt and its candidate objects."""
    pairs = [(prompt, c) for prompt, cands in facts.items() for c in cands]
    if not pairs:
        return {}
    scores = score_pairs(model, tok, pairs)
    out: dict[str, dict] = {}
    for (prompt, cand), lp, rank in zip(pairs, scores.mean_logprob.tolist(), scores.first_rank.tolist()):
        row = out.setdefault(prompt, {"probs": {}, "argmax": {}, "_lp": {}})
        row["probs"][cand] = math.exp(lp)
        row["argmax"][cand] = rank == 0
        row["_lp"][cand] = lp
    for row in out.values():
        row["answer"] = max(row.pop("_lp").items(), key=lambda kv: kv[1])[0]
    return out
