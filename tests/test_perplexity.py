"""Perplexity (the ME-PPL collapse check) on cases with known answers."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation.perplexity import perplexity
from pipeline.models.adapters import adapter_for

TEXTS = ["the cat sat on the mat", "a much longer sentence about the city of paris and its river", "hello world"]


def test_uniform_model_has_vocabulary_size_perplexity(model_factory):
    model, tok = model_factory("llama")
    head = adapter_for(model).module(model, "lm_head")
    with torch.no_grad():
        saved = head.weight.clone()
        head.weight.zero_()  # every logit 0: every token has probability 1/V
        try:
            assert perplexity(model, tok, TEXTS) == pytest.approx(model.config.vocab_size, rel=1e-5)
        finally:
            head.weight.copy_(saved)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_token_weighted_reference_and_ignores_batching(model_factory, family):
    model, tok = model_factory(family)
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in TEXTS:
            ids = torch.tensor([tok(t)["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    expected = math.exp(nll / n)
    assert perplexity(model, tok, TEXTS, batch_size=1) == pytest.approx(expected, rel=1e-4)
    assert perplexity(model, tok, TEXTS, batch_size=3) == pytest.approx(expected, rel=1e-4)


def test_rejects_empty_input(model_factory):
    model, tok = model_factory("llama")
    with pytest.raises(ValueError, match="at least one text"):
        perplexity(model, tok, [])
