"""Neighbour-assisted editing (Baghel et al. 2025, §3.2): which neighbour prompts join the value loss.

A neighbour of an edit ``(s, r, o → o*)`` is a prompt ``(s̃, r)`` with another subject and the same
relation whose answer is still ``o`` (CounterFact's ``neighborhood_samples``; entry ``j`` there is
the template + subject of ``neighborhood_prompts[j]``).  The value loss gets ``− ln P(o | s̃, r)``
with ``δ`` added at ``s̃``'s last token, so the optimised vector cannot simply push every subject of
the relation towards ``o*``.

Only neighbours the *unedited* model answers with ``o`` (every answer token the argmax,
teacher-forced) are usable — otherwise the term would teach the model a fact it does not hold
(App. B.2).  The first ``n`` usable ones in record order are taken (the paper samples at random;
record order is deterministic without a seed).  Those prompts are then no longer a fair test of
specificity for that request: :attr:`Neighbors.indices` is what evaluation leaves out
(``pipeline.evaluation.protocols.evaluate(..., editing_neighbors=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.requests import EditRequest, RequestError
from pipeline.evaluation.scoring import score_pairs


@dataclass(frozen=True)
class Neighbors:
    prompts: list[list[tuple[str, str, str]]]  # per request: (template, subject, true object)
    indices: list[list[int]]  # per request: indices into neighborhood_samples / neighborhood_prompts


def neighbor_candidates(req: EditRequest, where: str = "request") -> list[tuple[str, str]]:
    """``(template, subject)`` of every neighbourhood sample of a CounterFact request, checked."""
    out = []
    for j, sample in enumerate(req.record.get("neighborhood_samples") or []):
        if not isinstance(sample, dict) or not isinstance(sample.get("prompt"), str) or \
                not isinstance(sample.get("subject"), str) or sample["prompt"].count("{}") != 1 or not sample["subject"]:
            raise RequestError(f"{where}: neighborhood_samples[{j}] must be {{'prompt' with one '{{}}', 'subject'}}")
        out.append((sample["prompt"], sample["subject"]))
    return out


def check_neighbor_requests(requests: list[EditRequest], n: int) -> None:
    """Neighbour-assisted editing needs CounterFact records with true objects and neighbourhood
    samples: checked before any model work (and at ``editledger add``)."""
    if not n:
        return
    for i, r in enumerate(requests):
        if r.fmt != "counterfact" or not r.record.get("neighborhood_samples") or not r.target_true:
            raise RequestError(f"request {i}: neighbour-assisted editing (neighbors={n}) needs a CounterFact record "
                               "with target_true and neighborhood_samples")
        neighbor_candidates(r, f"request {i}")


def select_neighbors(model, tok, requests: list[EditRequest], n: int) -> Neighbors:
    """Up to ``n`` neighbours per request that the (unedited) ``model`` answers with the true object."""
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n}")
    cands = []
    for i, r in enumerate(requests):
        if not r.target_true:
            raise RequestError(f"request {i}: neighbour-assisted editing needs target_true")
        cands.append(neighbor_candidates(r, f"request {i}"))
    pairs = [(t.replace("{}", s), r.target_true) for r, cs in zip(requests, cands) for t, s in cs]
    correct = score_pairs(model, tok, pairs).token_correct.tolist() if pairs else []
    prompts, indices, k = [], [], 0
    for r, cs in zip(requests, cands):
        ok = [j for j in range(len(cs)) if correct[k + j] == 1.0][:n]
        k += len(cs)
        prompts.append([(cs[j][0], cs[j][1], r.target_true) for j in ok])
        indices.append(ok)
    return Neighbors(prompts, indices)
