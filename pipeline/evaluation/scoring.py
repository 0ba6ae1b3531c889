"""Teacher-forced scoring of (prompt, answer) pairs: each distinct forward once, logits only where read.

Every metric of the CounterFact and zsRE protocols reduces to: the log-probabilities the model
gives each answer token after the prompt (and whether each is the argmax).  Scoring a pair reads
the logits of the sequence ``prompt + answer[:-1]``; a causal model gives the same logits for a
sequence's positions whatever follows them, so a sequence that is a prefix of another needs no
forward of its own.  The two answers of a CounterFact prompt (new and true object; 85% of them one
token on SmolLM2) mostly share one sequence, the prompt itself: the pairs of a batch of 100
CounterFact requests need 15k forward tokens instead of 28k.

Sequences are forwarded in batches of one length (:mod:`pipeline.evaluation.batching`), so a
pair's numbers do not depend on which other pairs are scored with it; with ``cache``, pairs
already scored on the same model state are read back instead (:mod:`pipeline.evaluation.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline import distributed
from pipeline.evaluation.batching import filled, length_batches
from pipeline.tokens import encode_prompt, target_ids
from pipeline.models.adapters import adapter_for

SCORE_BATCH = 64


@dataclass
class Scores:
    mean_logprob: torch.Tensor  # [M] mean over answer tokens of log P(token | prefix)
    token_correct: torch.Tensor  # [M] fraction of answer tokens that are the argmax
    n_tokens: torch.Tensor  # [M]
    first_rank: torch.Tensor  # [M] rank of the answer's first token among the vocabulary (0 = argmax)

    @property
    def mean_prob(self) -> torch.Tensor:
        """exp(mean log-prob): ROME/MEMIT's per-answer probability used in magnitudes."""
        return self.mean_logprob.exp()

    def split(self, at: int) -> tuple[Scores, Scores]:
        """The first ``at`` pairs and the rest."""
        parts = [(f[:at], f[at:]) for f in (self.mean_logprob, self.token_correct, self.n_tokens, self.first_rank)]
        return Scores(*(p[0] for p in parts)), Scores(*(p[1] for p in parts))


Pair = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, answer ids)


def carriers(pairs: list[Pair]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The sequences to forward (none a prefix of another) and, per pair, the one holding its
    ``prompt + answer[:-1]`` as a prefix."""
    wanted = {p + a[:-1] for p, a in pairs}
    inner = {s[:k] for s in wanted for k in range(1, len(s))}
    seqs = sorted(s for s in wanted if s not in inner)
    holder = {}
    for i, s in enumerate(seqs):
        for k in range(1, len(s) + 1):
            holder.setdefault(s[:k], i)
    return seqs, [holder[p + a[:-1]] for p, a in pairs]


@torch.no_grad()
def score_tokens(model, pairs: list[Pair], batch_size: int = SCORE_BATCH) -> Scores:
    """:class:`Scores` of token-id pairs, in input order (see the module docstring).  Under
    ``torchrun`` the batches are shared among the ranks and their results gathered: a batch's
    numbers do not depend on where it runs, so every rank returns the single process's bits."""
    adapter = adapter_for(model)
    backbone = adapter.module(model, "backbone")
    device = next(model.parameters()).device
    seqs, holder = carriers(pairs)
    n = torch.tensor([len(a) for _, a in pairs], dtype=torch.long)
    offset = (n.cumsum(0) - n).tolist()  # where each pair's answer tokens start in the flat arrays
    # per carrier and read position: the flat indices of the answer tokens read there
    reads: list[dict[int, list[int]]] = [{} for _ in seqs]
    for j, ((p, a), c) in enumerate(zip(pairs, holder)):
        for t in range(len(a)):
            reads[c].setdefault(len(p) - 1 + t, []).append(offset[j] + t)
    token = torch.tensor([x for _, a in pairs for x in a], dtype=torch.long)
    first = torch.zeros(len(token), dtype=torch.bool)
    first[offset] = True

    def run(idx: list[int]) -> tuple[torch.Tensor, ...]:
        """One batch: the flat indices it reads, their log-prob and argmax hit; the first tokens' ranks."""
        rows = filled(idx, idx[0])
        hidden = backbone(input_ids=torch.tensor([seqs[i] for i in rows], device=device),
                          use_cache=False).last_hidden_state
        at = [(b, pos) for b, i in enumerate(rows) for pos in sorted(reads[i])]
        logp = F.log_softmax(adapter.logits(model, hidden[[b for b, _ in at], [pos for _, pos in at]]).float(), -1)
        # the answer tokens read at each position (filler rows read nothing)
        row_of = torch.tensor([r for r, (b, pos) in enumerate(at) if b < len(idx) for _ in reads[rows[b]][pos]],
                              device=device)
        flat = torch.tensor([f for b, pos in at if b < len(idx) for f in reads[rows[b]][pos]])
        asked = token[flat].to(device)
        lp = logp[row_of, asked]
        head = first[flat]
        rank = (logp[row_of[head.to(device)]] > lp[head.to(device), None]).sum(-1)
        return flat, lp.cpu(), (logp.argmax(-1)[row_of] == asked).float().cpu(), rank.cpu()

    tok_lp, tok_ok = torch.empty(len(token)), torch.empty(len(token))
    rank = torch.empty(len(token), dtype=torch.long)
    for flat, lp, ok, head_rank in distributed.map_shared(run, length_batches([len(s) for s in seqs], batch_size),
                                                          "scoring"):
        tok_lp[flat], tok_ok[flat] = lp, ok
        rank[flat[first[flat]]] = head_rank
    owner = torch.repeat_interleave(torch.arange(len(pairs)), n)
    sum_lp = torch.zeros(len(pairs)).index_add_(0, owner, tok_lp)
    sum_ok = torch.zeros(len(pairs)).index_add_(0, owner, tok_ok)
    return Scores(sum_lp / n, sum_ok / n, n, rank[offset])


def score_pairs(model, tok, pairs: list[tuple[str, str]], batch_size: int = SCORE_BATCH, cache=None) -> Scores:
    """:class:`Scores` of text pairs (the answer continues the prompt after a space); ``cache``: an
    :class:`~pipeline.evaluation.cache.StateCache` of the model's state, read and filled."""
    encoded = [(tuple(encode_prompt(tok, p)), tuple(target_ids(tok, a))) for p, a in pairs]
    if cache is None:
        return score_tokens(model, encoded, batch_size)
    return cache.scores(encoded, lambda todo: score_tokens(model, todo, batch_size))
