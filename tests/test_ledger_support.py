"""Helpers shared by the ledger tests (and the kill -9 child process); holds no tests itself.

A tiny random Llama (2 layers, hidden 32) and fake deltas: the ledger only stores, hashes and
replays deltas, so no real editing is needed to test it.
"""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.models.weights import apply_deltas
from pipeline.ledger import append as store

PARAMS = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight")
# 1e-05 is written "1e-05" in canonical JSON: a byte-flip test turns it into "1E-05" (same value).
HP = {"layers": [0, 1], "v_lr": 0.5, "mom2_update_weight": 15000.0, "kl_stop": 1e-05}
COV = {"mlp_out@0": "cov-aaaa", "mlp_out@1": "cov-bbbb"}


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


def batch_requests(n: int, k: int = 2) -> list[dict]:
    return [{"subject": f"Subject {n}.{i}", "prompt": "{} is located in", "target_new": f"Place {n}.{i}",
             "target_true": f"Home {n}.{i}", "case_id": 10 * n + i} for i in range(k)]


def fake_deltas(model, n: int, params=PARAMS, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + n)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    return {p: torch.randn(shapes[p], generator=g) * scale for p in params}


def add(ledger, model, n: int, base_fp: str, **kw):
    """Append batch ``n`` (fake deltas) onto ``model`` (in the current state; left edited)."""
    return store.append_edit(ledger, base_fp, batch_requests(n), "fake", HP, COV, fake_deltas(model, n),
                             {"efficacy": n / 10, "fluency": {"ngram_entropy": 5.0 + n}}, model=model, **kw)


def reference(base, ops: list[tuple[dict[str, torch.Tensor], int]]):
    """Independent construction of an expected state: base + deltas, in order."""
    m = copy.deepcopy(base)
    for deltas, sign in ops:
        apply_deltas(m, deltas, sign)
    return m


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
