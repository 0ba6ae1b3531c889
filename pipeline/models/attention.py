"""The attention kernel a heavy loop runs with, switched for the loop and restored after.

Value optimisation runs many short suffixes (2–10 tokens after the subject's last token, over a
cached prefix) forward *and backward*.  On CPU, PyTorch's fused SDPA ("flash") kernel spent
36% of a PMET step on SmolLM2-135M in the backward of these tiny attention blocks (15 ms per
call); the plain matmul + softmax ("eager") formulation does the same work in a few batched
``bmm`` calls, and the whole step became 1.8× faster (``benchmarks/RESULTS.md``, issue 6).  Which
kernel runs changes the float rounding, so it is a recorded hyper-parameter (``v_attention``),
not a silent default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

GROUPED = "editledger_grouped"  # the name "grouped" is registered under with transformers
# "model": whatever the model was loaded with; "grouped": eager without repeating K/V (below)
ATTENTION_CHOICES = ("model", "eager", "sdpa", "grouped")


def grouped_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, **_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention for grouped-query models that never materialises repeated keys and values.

    transformers' eager kernel copies each K/V head to every query head of its group
    (``repeat_kv``) and, in the backward, sums the copies again; for the engine's short suffixes
    those copies and sums were a visible share of a step.  Here the query heads of a group are
    stacked along the query axis instead, so one ``matmul`` per KV head serves the whole group:
    the same forward products, summed in the same order (the backward's sums may round
    differently).  Same interface as the eager kernel (Gemma's logit soft-capping included; dropout
    is refused: this kernel is for inference and value optimisation, which run the model in eval
    mode).
    """
    if dropout and module.training:
        raise ValueError("grouped attention does not implement dropout; use v_attention: eager to train")
    b, h, q_len, d = query.shape
    kv = key.shape[1]
    g = h // kv
    k_len = key.shape[2]
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    q = query.reshape(b, kv, g * q_len, d)
    scores = torch.matmul(q, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(b, kv, g, q_len, k_len)
    if attention_mask is not None:
        mask = attention_mask[..., :k_len]
        scores = scores + (mask.view(b, kv, g, q_len, k_len) if mask.shape[1] == h else mask[:, :, None])
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights.view(b, kv, g * q_len, k_len), value)
    return out.view(b, h, q_len, d).transpose(1, 2).contiguous(), weights.view(b, h, q_len, k_len)


AttentionInterface.register(GROUPED, grouped_attention)
AttentionMaskInterface.register(GROUPED, eager_mask)  # the same additive float mask as "eager"


@contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """Run the body with ``model``'s attention set to ``name``; the model's own choice comes back after.

    Models whose attention cannot be switched at run time (those not built on transformers'
    attention interface) keep their own kernel: the result is still deterministic, only not faster.
    """
    before = model.config._attn_implementation
    name = GROUPED if name == "grouped" else name
    switch = name != "model" and name != before and model._can_set_attn_implementation()
    if switch:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)
