"""Teacher-forced scoring of (prompt, answer) pairs, batched, logits only where they are read.

Every metric of the CounterFact and zsRE protocols reduces to: the log-probabilities the model
gives each answer token after the prompt (and whether each is the argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.tokens import encode_prompt, pad_right, target_ids
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


@torch.no_grad()
def score_pairs(model, tok, pairs: list[tuple[str, str]], batch_size: int = SCORE_BATCH) -> Scores:
    adapter = adapter_for(model)
    backbone = adapter.module(model, "backbone")
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    encoded = [(encode_prompt(tok, p), target_ids(tok, a)) for p, a in pairs]
    # sort by length so batches pad little; results are put back in input order
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
    out_lp = torch.empty(len(pairs))
    out_acc = torch.empty(len(pairs))
    out_n = torch.empty(len(pairs), dtype=torch.long)
    out_rank = torch.empty(len(pairs), dtype=torch.long)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [encoded[i][0] + encoded[i][1][:-1] for i in idx]
        ids, mask = pad_right(seqs, pad)
        hidden = backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        rows, cols, toks, owner, firsts = [], [], [], [], []
        for b, i in enumerate(idx):
            p, a = encoded[i]
            firsts.append(len(toks))
            for t, tid in enumerate(a):
                rows.append(b)
                cols.append(len(p) - 1 + t)
                toks.append(tid)
                owner.append(b)
        logits = adapter.logits(model, hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)])
        logp = F.log_softmax(logits.float(), -1)
        toks_t = torch.tensor(toks, device=device)
        tok_lp = logp.gather(1, toks_t[:, None]).squeeze(1).cpu()
        correct = (logp.argmax(-1) == toks_t).float().cpu()
        rank = (logp > logp.gather(1, toks_t[:, None])).sum(-1).cpu()
        owner_t = torch.tensor(owner)
        n = torch.bincount(owner_t, minlength=len(idx))
        sum_lp = torch.zeros(len(idx)).index_add_(0, owner_t, tok_lp)
        sum_ok = torch.zeros(len(idx)).index_add_(0, owner_t, correct)
        for b, i in enumerate(idx):
            out_rank[i] = rank[firsts[b]]
            out_lp[i] = sum_lp[b] / n[b]
            out_acc[i] = sum_ok[b] / n[b]
            out_n[i] = n[b]
    return Scores(out_lp, out_acc, out_n, out_rank)
