"""The evaluation suite's metrics on hand-made cases whose answers are known in advance.

A "forced" model has its LM head replaced by a fixed distribution (a forward hook), so every
probability, rank, argmax and sampled token is known; the pure metrics (n-gram entropy, TF-IDF,
retention sampling, the summary's row 0) are checked on hand-computed values.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager

import pandas as pd
import pytest
import torch

from conftest import counterfact_record
from pipeline.requests import parse_requests
from pipeline.tokens import target_ids
from pipeline.evaluation.consistency import Tfidf
from pipeline.evaluation.fluency import fluency, ngram_entropy, ngram_entropy_bits, words
from pipeline.evaluation.generation import DecodingSettings, generate
from pipeline.evaluation.protocols import evaluate
from pipeline.evaluation.retention import Candidate, RetentionSettings, plan
from pipeline.evaluation.suite import CONSISTENCY_KEY, evaluate_state
from pipeline.models.adapters import adapter_for
from pipeline.stages.summary import COLUMNS, METRICS, history_table, summary_lines, summary_metrics

WORDS = (" English", " French", " Islam", " piano", " guitar", " Sweden", " Spain", " language", " religion")


@contextmanager
def forced(model, probs: dict[int, float]):
    """Every position's next-token distribution is ``probs`` (the rest shares what is left)."""
    head = adapter_for(model).module(model, "lm_head")
    vocab = head.weight.shape[0]
    rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
    p = torch.full((vocab,), rest)
    for t, v in probs.items():
        p[t] = v
    logits = p.clamp_min(1e-30).log()
    handle = head.register_forward_hook(lambda mod, inp, out: logits.to(out).expand(*out.shape[:-1], vocab))
    try:
        yield
    finally:
        handle.remove()


def single_token_words(tok, n: int) -> list[tuple[str, int]]:
    found = [(w.strip(), target_ids(tok, w)[0]) for w in WORDS if len(target_ids(tok, w)) == 1]
    assert len(found) >= n, found
    return found[:n]


# ------------------------------------------------------------------------------------ CounterFact

def test_counterfact_metrics_with_forced_probabilities(llama):
    model, tok = llama
    (new, t_new), (true, t_true) = single_token_words(tok, 2)
    reqs = parse_requests([counterfact_record(0, "Danielle Darrieux", "The mother tongue of {} is", new, true)])
    with forced(model, {t_new: 0.5, t_true: 0.3}):
        m, df = evaluate(model, tok, reqs)
    assert df["p_new"].tolist() == pytest.approx([0.5] * 3, rel=1e-5)
    assert df["p_true"].tolist() == pytest.approx([0.3] * 3, rel=1e-5)
    assert df["rank_new"].tolist() == [0, 0, 0] and df["rank_true"].tolist() == [1, 1, 1]
    assert df["success"].tolist() == [True, True, False]  # rewrite, paraphrase, neighbourhood
    assert m["efficacy"] == 1 and m["generalization"] == 1 and m["specificity"] == 0 and m["score"] == 0
    assert m["efficacy_magnitude"] == pytest.approx(0.2, abs=1e-5)
    assert m["specificity_magnitude"] == pytest.approx(-0.2, abs=1e-5)
    assert m["efficacy_accuracy"] == 1 and m["specificity_accuracy"] == 0
    # the other way round: the true object wins everywhere
    with forced(model, {t_new: 0.1, t_true: 0.6}):
        m, _ = evaluate(model, tok, reqs)
    assert (m["efficacy"], m["generalization"], m["specificity"]) == (0, 0, 1)
    assert m["specificity_magnitude"] == pytest.approx(0.5, abs=1e-5)


# ------------------------------------------------------------------------------------------- zsRE

def test_zsre_token_accuracy_with_a_forced_argmax(llama):
    model, tok = llama
    (a, t_a), (b, _), (c, _) = single_token_words(tok, 3)
    two = f"{a} {b}"
    assert len(target_ids(tok, two)) == 2
    recs = [{"subject": "Rome", "src": "Where is Rome?", "alt": a, "answers": [c], "rephrase": "Rome is in which country?",
             "loc": "nq question: capital of France", "loc_ans": b},
            {"subject": "Madrid", "src": "Where is Madrid?", "alt": two, "answers": [c],
             "rephrase": "Madrid is in which country?", "loc": "nq question: capital of Spain", "loc_ans": a}]
    with forced(model, {t_a: 0.9}):  # the argmax is always token a
        m, df = evaluate(model, tok, parse_requests(recs))
    acc = df.set_index(["request", "kind"])["token_accuracy"]
    assert acc[(0, "rewrite")] == 1 and acc[(0, "paraphrase")] == 1 and acc[(0, "neighborhood")] == 0
    assert acc[(1, "rewrite")] == 0.5 and acc[(1, "neighborhood")] == 1  # "a b": first token right only
    assert m["efficacy"] == pytest.approx(0.75) and m["generalization"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(0.5)
    assert df.loc[df["answer"] == a, "rank"].eq(0).all()


# ------------------------------------------------------------------------------------- fluency

def test_ngram_entropy_known_values():
    assert words("Hello, world!") == ["Hello", ",", "world", "!"]
    # "a b c d": 3 distinct bigrams (log2 3 bits), 2 distinct trigrams (1 bit)
    assert ngram_entropy_bits(["a", "b", "c", "d"], 2) == pytest.approx(math.log2(3))
    assert ngram_entropy("a b c d") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    # a text that repeats one word has a single bigram and trigram: zero entropy
    assert ngram_entropy("the the the the the the") == 0.0
    # bigrams (a,b) (b,a) (a,b): probabilities 2/3, 1/3
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy_bits(words("a b a b"), 2) == pytest.approx(h2)
    assert fluency(["a b c d", "the the the"]) == pytest.approx(ngram_entropy("a b c d") / 2)
    assert ngram_entropy("one") == 0.0


# ----------------------------------------------------------------------------------- consistency

def test_tfidf_cosine_identical_disjoint_and_hand_computed():
    tf = Tfidf.fit(["aa bb", "bb cc", "cc dd"])
    assert tf.idf["bb"] == pytest.approx(math.log(4 / 3) + 1)
    assert tf.idf["aa"] == pytest.approx(math.log(4 / 2) + 1)
    assert tf.cosine("aa bb cc", "aa bb cc") == pytest.approx(1.0)
    assert tf.cosine("aa bb", "cc dd") == 0.0
    assert tf.cosine("AA", "aa, aa!") == pytest.approx(1.0)  # lower-cased, punctuation ignored
    assert tf.cosine("zz yy", "zz yy") == 0.0  # no word in the fitted vocabulary
    ia, ib = tf.idf["aa"], tf.idf["bb"]
    assert tf.cosine("aa", "aa bb") == pytest.approx(ia / math.hypot(ia, ib))


# ------------------------------------------------------------------------------------ generation

def test_generation_of_a_forced_model_is_known(llama):
    model, tok = llama
    (w, t), = single_token_words(tok, 1)
    s = DecodingSettings(max_new_tokens=6, top_k=5, batch_size=2)
    with forced(model, {t: 1.0}):
        texts = generate(model, tok, ["The city of Rome is", "Paris"], ["k1", "k2"], s)
    assert texts == ["The city of Rome is" + tok.decode([t] * 6), "Paris" + tok.decode([t] * 6)]
    assert ngram_entropy(texts[1]) == pytest.approx(ngram_entropy("Paris" + f" {w}" * 6))
    with forced(model, {tok.eos_token_id: 1.0}):  # EOS first: nothing is generated
        assert generate(model, tok, ["Paris"], ["k"], s) == ["Paris"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_is_seeded_per_sequence_and_independent_of_batching(model_factory, family):
    model, tok = model_factory(family)
    prompts = ["The capital of France is", "Rome", "Many people speak English, French or", "The piano"]
    keys = [f"r{i}" for i in range(len(prompts))]
    s = DecodingSettings(max_new_tokens=8, batch_size=4)
    together = generate(model, tok, prompts, keys, s)
    assert together == generate(model, tok, prompts, keys, s)
    one_by_one = [generate(model, tok, [p], [k], DecodingSettings(max_new_tokens=8, batch_size=1))[0]
                  for p, k in zip(prompts, keys)]
    assert one_by_one == together  # left padding and position ids do not change a sequence
    other = generate(model, tok, prompts, keys, DecodingSettings(max_new_tokens=8, batch_size=4, seed=1))
    assert other != together and all(t.startswith(p) for t, p in zip(other, prompts))


def test_suite_adds_generation_metrics_to_counterfact(llama, cf_records, corpus_path):
    model, tok = llama
    rec = cf_records[0]
    rec["attribute_prompts"] = ["Paris, speaker of", "The mother tongue of Rome is"]
    rec["generation_prompts"] = ["Danielle Darrieux is", "Danielle Darrieux speaks", "unused third"]
    reqs = parse_requests([rec])
    tf = Tfidf.fit(corpus_path.read_text().splitlines())
    s = DecodingSettings(prompts_per_record=2, max_new_tokens=5)
    m, df = evaluate_state(model, tok, reqs, s, tf)
    gen = df[df["kind"] == "generation"]
    assert gen["prompt"].tolist() == rec["generation_prompts"][:2] and m["n_generations"] == 2
    assert m["fluency"] == pytest.approx(gen["ngram_entropy"].mean())
    ref = " ".join(f"{p} {rec['requested_rewrite']['target_new']['str']}" for p in rec["attribute_prompts"])
    assert m[CONSISTENCY_KEY] == pytest.approx(tf.cosine(" ".join(gen["generation"]), ref))
    m2, df2 = evaluate_state(model, tok, reqs, s, tf)
    assert df2["generation"].tolist() == df["generation"].tolist() and m2 == m
    m3, df3 = evaluate_state(model, tok, reqs, s, None)  # no generation asked
    assert "fluency" not in m3 and (df3["kind"] != "generation").all()


# ------------------------------------------------------------------------------------- retention

def _cands(n: int, batch: str = "0001-aaaaaaaaaaaa") -> list[Candidate]:
    return [Candidate(batch, i, f'{{"subject": "{batch} s{i}"}}') for i in range(n)]


def test_retention_sample_is_seeded_order_free_and_stable_as_the_pool_grows():
    pool = _cands(40)
    s = RetentionSettings(sample=5, full_every=0, seed=0)
    a = plan(7, pool, s)
    assert a.mode == "sample" and len(a.chosen) == 5 and a.n_available == 40
    assert plan(7, pool, s) == a and plan(8, pool, s).chosen == a.chosen  # the asking batch does not matter
    shuffled = pool[:]
    random.Random(1).shuffle(shuffled)
    assert set(plan(7, shuffled, s).chosen) == set(a.chosen)
    assert set(plan(7, pool, RetentionSettings(sample=5, full_every=0, seed=1)).chosen) != set(a.chosen)
    grown = pool + _cands(20, "0002-bbbbbbbbbbbb")
    assert set(plan(9, grown, s).chosen) <= set(a.chosen) | set(grown[40:])
    d = a.describe()
    assert d["mode"] == "sample" and d["n_evaluated"] == 5 and d["sample"] == 5 and d["seed"] == 0


def test_retention_modes():
    pool = _cands(12)
    assert plan(3, [], RetentionSettings()).mode == "none"
    assert plan(3, pool, RetentionSettings(sample=None)).chosen == tuple(pool)
    assert plan(3, pool, RetentionSettings(sample=50)).mode == "all"
    every = RetentionSettings(sample=2, full_every=5)
    assert plan(10, pool, every).mode == "all" and plan(11, pool, every).mode == "sample"
    assert len(plan(11, pool, every).chosen) == 2


# --------------------------------------------------------------------------------- summary, report

def _ledger_frame() -> pd.DataFrame:
    rows = []
    for seq, (n, eff, ppl) in enumerate([(10, 0.2, 20.0), (30, 0.5, 20.0)], 1):
        r = dict.fromkeys(COLUMNS)
        r.update(seq=seq, dir=f"{seq:04d}-{'a' * 12}", kind="edit", method="pmet", protocol="counterfact",
                 n_requests=n, n_active_requests=10 if seq == 1 else 40, status="committed", active=True,
                 approximate=False, base_efficacy=eff, post_efficacy=1.0, post_score=0.9, ppl_base=ppl,
                 ppl=ppl + seq, retention_mode="none" if seq == 1 else "all", ret_efficacy=None if seq == 1 else 0.8,
                 delta_norm=1.0, delta_norm_layer_1=0.6, delta_norm_layer_2=0.8)
        rows.append(r)
    rows.append({**dict.fromkeys(COLUMNS), "seq": 3, "dir": f"0003-{'b' * 12}", "kind": "revert",
                 "status": "committed", "active": True, "n_active_requests": 10})
    df = pd.DataFrame(rows)
    df["n_requests"] = df["n_requests"].astype("Int64")
    return df


def test_summary_row_0_is_the_unedited_model():
    h = history_table(_ledger_frame())
    assert h["seq"].tolist() == [0, 1, 2, 3] and h["kind"].iloc[0] == "base"
    row0 = h.iloc[0]
    assert row0["n_active_requests"] == 0 and row0["n_requests"] == 40
    assert row0["post_efficacy"] == pytest.approx((10 * 0.2 + 30 * 0.5) / 40)  # pooled by batch size
    assert row0["base_efficacy"] == row0["post_efficacy"] and row0["ppl"] == 20.0
    assert pd.isna(row0["post_specificity"])  # nothing to pool
    m = summary_metrics(h)
    assert m["batches"] == 3 and m["base"]["efficacy"] == pytest.approx(0.425) and m["base"]["ppl"] == 20.0
    assert m["last"]["seq"] == 2 and m["last"]["ret_efficacy"] == 0.8 and m["last"]["ppl"] == 22.0
    assert set(m["base"]) <= set(METRICS) | {"ppl"}


def test_the_printed_summary_says_what_is_active_how_it_scores_and_the_collapse_check():
    frame = _ledger_frame()
    frame.loc[frame["seq"] == 1, "active"] = False  # the revert (seq 3) left only batch 2 active
    m = summary_metrics(history_table(frame))
    assert m["active_base"]["efficacy"] == 0.5 and m["active_post"]["efficacy"] == 1.0
    lines = summary_lines(m)
    assert lines[0] == "3 batches (3 committed, 0 refused by the collapse guard), 30 edits active in 1 batches"
    assert "efficacy 0.500 → 1.000" in lines[1]
    assert lines[2].strip() == "earlier edits kept after batch 2:  efficacy 0.800"
    assert lines[3].strip() == "ME-PPL-50 (collapse check): 20.0 unedited → 22.0 now (1.10×)"
    assert len("\n".join(lines)) < 600  # a glance, not a dump


def test_report_page_is_self_contained():
    from pipeline.report.page import html_page

    h = history_table(_ledger_frame())
    page = html_page(h, summary_metrics(h), None)
    assert page.count("src='data:image/png;base64,") == 5
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "<td>0.425</td>" in page  # row 0 in the table
