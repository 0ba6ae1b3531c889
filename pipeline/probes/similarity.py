"""PMET §3.2: how much attention and MLP change the last token's hidden state, layer by layer.

For every layer, the cosine similarity of the last-token state before and after the attention's
contribution (``h_in`` → ``h_mid``) and before and after the MLP's (``h_mid`` → ``h_out``), and
the Jaccard similarity of the top-``k`` (50) vocabulary tokens of their logit-lens projections.
PMET reports that in late layers the MLP states settle (similarities near 1) while attention keeps
changing them — the reason it edits with an attention vector in the optimisation but writes only
the MLP.
"""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.models.adapters import adapter_for
from pipeline.probes.capture import capture_states, logit_lens

TOP_K = 50


def jaccard_topk(logp_a: torch.Tensor, logp_b: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """``|top_k(a) ∩ top_k(b)| / |top_k(a) ∪ top_k(b)|`` row-wise for ``[N, V]`` scores."""
    ta, tb = logp_a.topk(k, -1).indices, logp_b.topk(k, -1).indices
    inter = (ta[:, :, None] == tb[:, None, :]).any(-1).sum(-1).float()
    return inter / (2 * k - inter)


def component_similarity(model, tok, items: list[tuple[str, str]], k: int = TOP_K,
                         record_ids: list | None = None) -> pd.DataFrame:
    """One row per (item, layer, component ∈ {attention, mlp}) at the last token: cosine, Jaccard@k."""
    adapter = adapter_for(model)
    st = capture_states(model, tok, adapter, items)
    last = 1  # POSITIONS index of the prediction (last) token
    rows = []
    n_layers, n = st.h_in.shape[:2]
    for layer in range(n_layers):
        h_in, h_mid, h_out = st.h_in[layer, :, last], st.h_mid[layer, :, last], st.h_out[layer, :, last]
        lens = logit_lens(model, adapter, torch.stack([h_in, h_mid, h_out]))
        for comp, (a, b, la, lb) in {"attention": (h_in, h_mid, lens[0], lens[1]),
                                     "mlp": (h_mid, h_out, lens[1], lens[2])}.items():
            cos = F.cosine_similarity(a, b, dim=-1)
            jac = jaccard_topk(la, lb, k)
            for i in range(n):
                rows.append({"record": record_ids[i] if record_ids else i, "layer": layer, "component": comp,
                             "cosine": float(cos[i]), f"jaccard_top{k}": float(jac[i])})
    return pd.DataFrame(rows)
