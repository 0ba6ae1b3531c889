"""Perplexity of a model on a list of texts: the collapse check (ME-PPL-50).

Editing can break a model without hurting the edited facts ("model collapse", Yang et al. 2024);
the symptom is perplexity on ordinary text shooting up.  The number is token-level:
``exp(Σ NLL / Σ predicted tokens)`` over all texts, each tokenised on its own with the tokenizer's
BOS token (if it adds one) and cut to ``max_length`` tokens, so texts of different length weigh by
their token count, as in the ME-PPL paper's token-averaged perplexity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline import distributed
from pipeline.tokens import pad_right
from pipeline.models.adapters import adapter_for


def perplexity(model, tok, texts: list[str], max_length: int = 256, batch_size: int = 8, cache=None) -> float:
    """Token-level perplexity of ``model`` on ``texts`` (see the module docstring); ``cache``: the
    :class:`~pipeline.evaluation.cache.StateCache` of the model's state."""
    if not texts:
        raise ValueError("perplexity needs at least one text")
    encoded = [tok(t)["input_ids"][:max_length] for t in texts]
    if any(len(e) < 2 for e in encoded):
        raise ValueError("every perplexity text needs at least two tokens")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    if cache is None:
        return _perplexity(model, encoded, pad, batch_size)
    return cache.cached("perplexity", [[encoded, pad, batch_size]],
                        lambda todo: [_perplexity(model, *todo[0])])[0]


@torch.no_grad()
def _perplexity(model, encoded: list[list[int]], pad: int, batch_size: int) -> float:
    adapter = adapter_for(model)
    backbone = adapter.module(model, "backbone")
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))

    def run(idx: list[int]) -> tuple[float, int]:
        """One batch's summed NLL and predicted-token count."""
        ids, mask = pad_right([encoded[i] for i in idx], pad)
        ids, mask = ids.to(device), mask.to(device)
        hidden = backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        take = mask[:, 1:].bool()
        logits = adapter.logits(model, hidden[:, :-1][take])
        return float(F.cross_entropy(logits.float(), ids[:, 1:][take], reduction="sum")), int(take.sum())

    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    nll, count = 0.0, 0
    for part, n in distributed.map_shared(run, batches, "perplexity"):  # summed in batch order on every rank
        nll += part
        count += n
    return math.exp(nll / count)
