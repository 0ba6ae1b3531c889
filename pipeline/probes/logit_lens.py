"""JEEP §4.1: the contrast logit lens — where the original and the target answer gain information.

For every layer ``l`` the block output ``h^l`` at the subject's last token and at the prediction
(last prompt) token is projected to the vocabulary (``softmax(W_lm · ln_f(h^l))``); the
probability and the rank (number of tokens more likely) of the first token of the original answer
``o`` and of the target answer ``o*`` are recorded.  JEEP reads two stages off it: *information
enrichment* (the original answer's rank rises at the subject's last token in low layers) and
*probability promotion* (its probability rises at the prediction token in early high layers, while
the target's does not) — the two regions JEEP edits.
"""

from __future__ import annotations

import pandas as pd
import torch

from pipeline.tokens import target_ids
from pipeline.models.adapters import adapter_for
from pipeline.probes.capture import POSITIONS, capture_states, logit_lens


def rank_of(logp: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Number of vocabulary entries strictly more likely than ``token`` (0 = the argmax), row-wise."""
    own = logp.gather(-1, token[..., None])
    return (logp > own).sum(-1)


def contrast_logit_lens(model, tok, items: list[tuple[str, str, str, str]], record_ids: list | None = None) -> pd.DataFrame:
    """``items``: (template, subject, original answer, target answer).  One row per
    (item, layer, position, answer ∈ {original, target}) with ``prob`` and ``rank``."""
    adapter = adapter_for(model)
    st = capture_states(model, tok, adapter, [(t, s) for t, s, _, _ in items])
    first = lambda a: target_ids(tok, a)[0]  # noqa: E731
    answers = {"original": torch.tensor([first(o) for _, _, o, _ in items]),
               "target": torch.tensor([first(n) for _, _, _, n in items])}
    rows = []
    n_layers, n = st.h_out.shape[:2]
    for layer in range(n_layers):
        lens = logit_lens(model, adapter, st.h_out[layer])  # [N, 2, V]
        for p, pos in enumerate(POSITIONS):
            for name, ids in answers.items():
                lp = lens[:, p].gather(-1, ids[:, None]).squeeze(-1)
                rk = rank_of(lens[:, p], ids)
                for i in range(n):
                    rows.append({"record": record_ids[i] if record_ids else i, "layer": layer, "position": pos,
                                 "answer": name, "prob": float(lp[i].exp()), "rank": int(rk[i])})
    return pd.DataFrame(rows)
