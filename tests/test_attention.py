"""The grouped-query attention kernel: eager attention's results without repeating K/V heads."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from pipeline.models.attention import GROUPED, attention_implementation


def _logits_and_grad(model, impl, ids, mask):
    with attention_implementation(model, impl):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=emb, attention_mask=mask).logits
        (logits[mask.bool()] ** 2).sum().backward()
    return logits.detach()[mask.bool()], emb.grad


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt_neox"])
def test_grouped_attention_matches_eager_forward_and_backward(family):
    model = make_model(family).eval()
    cfg = model.config
    if family != "gpt_neox":  # the point: a model whose query heads share K/V heads
        assert cfg.num_attention_heads > cfg.num_key_value_heads
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, cfg.vocab_size, (3, 9), generator=gen)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0  # right padding, as the engine's suffix batches
    mask[1, :2] = 0  # left padding, as its prefix caches
    own = model.config._attn_implementation
    eager = _logits_and_grad(model, "eager", ids, mask)
    calls = []
    from transformers import AttentionInterface
    real = AttentionInterface._global_mapping[GROUPED]
    AttentionInterface._global_mapping[GROUPED] = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        grouped = _logits_and_grad(model, "grouped", ids, mask)
    finally:
        AttentionInterface._global_mapping[GROUPED] = real
    assert len(calls) == cfg.num_hidden_layers  # the kernel really ran, once per layer
    assert model.config._attn_implementation == own
    torch.testing.assert_close(grouped[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped[1], eager[1], rtol=1e-4, atol=1e-5)


def test_grouped_attention_refuses_dropout_in_training():
    model = make_model("llama", attention_dropout=0.1)
    model.train()
    ids = torch.randint(5, 100, (1, 4))
    with attention_implementation(model, "grouped"), pytest.raises(ValueError, match="dropout"):
        model(input_ids=ids)
