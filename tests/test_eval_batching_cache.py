"""Scores are a function of (model state, pair) alone, and the evaluation cache keeps every result.

Scoring forwards each distinct sequence once, in unpadded batches of one length, so a pair's scores
must not change, in any bit, with the other pairs scored beside it or with the batch size — which
is what makes a cached score (computed in another batch) exactly the one a fresh computation gives.
"""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.evaluation.cache import StateCache
from pipeline.evaluation.generation import DecodingSettings, generate
from pipeline.evaluation.perplexity import perplexity
from pipeline.evaluation.protocols import evaluate
from pipeline.evaluation.scoring import carriers, score_pairs
from pipeline.requests import parse_requests

PAIRS = [("The mother tongue of Danielle Darrieux is", "English"), ("The mother tongue of Danielle Darrieux is", "French"),
         ("The mother tongue of Danielle Darrieux is", "the language English"), ("Toko Yasuda, who plays", "the piano"),
         ("Toko Yasuda, who plays", "the guitar"), ("Rome", "France"), ("I", "Madrid is located in Spain"),
         ("The capital of France is", "Paris"), ("The capital of Italy is", "Rome"), ("Rome", "France")]
PROMPTS = ["The capital of France is", "Rome", "Many people speak English, French or", "The piano", "I think",
           "The city of Rome is", "Sweden is a"]


def fields(sc) -> list[torch.Tensor]:
    return [sc.mean_logprob, sc.token_correct, sc.n_tokens, sc.first_rank]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(fields(a), fields(b)))


def test_carriers_forward_each_distinct_sequence_once_and_none_that_another_contains():
    pairs = [((1, 2), (3,)), ((1, 2), (4,)), ((1, 2), (3, 5, 6)), ((1, 2), (3, 5)), ((7,), (8, 9)), ((7,), (8, 9))]
    seqs, holder = carriers(pairs)
    assert sorted(seqs) == [(1, 2, 3, 5), (7, 8)]  # (1, 2) and (1, 2, 3) are prefixes of (1, 2, 3, 5)
    for (p, a), c in zip(pairs, holder):
        assert seqs[c][: len(p) + len(a) - 1] == p + a[:-1]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_a_pairs_scores_do_not_depend_on_the_other_pairs_or_the_batch_size(model_factory, family):
    model, tok = model_factory(family)
    together = score_pairs(model, tok, PAIRS)
    for size in (1, 2, 64):
        assert same(score_pairs(model, tok, PAIRS, batch_size=size), together)
    for i, pair in enumerate(PAIRS):
        assert same(score_pairs(model, tok, [pair]), together.split(i)[1].split(1)[0])
    order = list(range(len(PAIRS)))
    random.Random(0).shuffle(order)
    shuffled = score_pairs(model, tok, [PAIRS[i] for i in order])
    assert all(torch.equal(f[order], g) for f, g in zip(fields(together), fields(shuffled)))


def test_the_cache_returns_what_the_model_computes_and_never_runs_the_model_twice(llama, tmp_path, monkeypatch,
                                                                                 cf_records):
    model, tok = llama
    path = tmp_path / "eval.sqlite3"
    cache = StateCache(path, "fingerprint-a", model)
    reqs = parse_requests(cf_records)
    fresh, fresh_df = evaluate(model, tok, reqs)
    first, first_df = evaluate(model, tok, reqs, cache=cache)
    assert cache.misses > 0 and cache.hits == 0
    texts = ["The capital of France is Paris.", "Rome is the capital of Italy and a very old city."]
    s = DecodingSettings(max_new_tokens=6)
    gen = generate(model, tok, PROMPTS, PROMPTS, s, cache)
    ppl = perplexity(model, tok, texts, cache=cache)

    def broken(*args, **kwargs):
        raise AssertionError("the model ran although every result is cached")

    backbone = model.get_submodule("model")
    monkeypatch.setattr(backbone, "forward", broken)
    again = StateCache(path, "fingerprint-a", model)  # a new process: a new connection to the same file
    second, second_df = evaluate(model, tok, reqs, cache=again)
    assert generate(model, tok, PROMPTS, PROMPTS, s, again) == gen
    assert perplexity(model, tok, texts, cache=again) == ppl
    assert again.misses == 0 and again.hits > 0
    assert fresh == first == second  # every metric, bit for bit
    assert fresh_df.equals(second_df) and first_df.equals(second_df)
    with pytest.raises(AssertionError, match="the model ran"):  # another state shares nothing
        evaluate(model, tok, reqs, cache=StateCache(path, "fingerprint-b", model))


def test_a_cache_is_per_tokenisation_and_decoding_setting(llama, tmp_path):
    model, tok = llama
    cache = StateCache(tmp_path / "eval.sqlite3", "fp", model)
    a = generate(model, tok, PROMPTS, PROMPTS, DecodingSettings(max_new_tokens=6, seed=0), cache)
    b = generate(model, tok, PROMPTS, PROMPTS, DecodingSettings(max_new_tokens=6, seed=1), cache)
    assert a == generate(model, tok, PROMPTS, PROMPTS, DecodingSettings(max_new_tokens=6, seed=0))
    assert b == generate(model, tok, PROMPTS, PROMPTS, DecodingSettings(max_new_tokens=6, seed=1))
    assert cache.hits == 0  # the seed is part of the question
