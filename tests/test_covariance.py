"""Key second moments E[k kᵀ]: correctness against a direct float64 computation, and the cache."""

from __future__ import annotations

import json

import pytest
import torch

import pipeline.editing.covariance as cov_mod
from pipeline.corpus import Corpus, Cut, summarise, windows
from pipeline.editing.covariance import (
    CovarianceCacheError,
    cache_key,
    compute_second_moments,
    key_id,
    load_entry,
    save_entry,
    second_moments,
)
from pipeline.editing.hooks import hooks, record_input
from pipeline.models.adapters import adapter_for
from pipeline.models.loading import model_fingerprint

MAX_LEN = 16


def _chunks(path, tok, **cut) -> list[list[int]]:
    return list(windows(Corpus.from_file(path), tok, Cut(MAX_LEN, **cut)))


def _direct(model, adapter, chunks, targets):
    """E[k kᵀ] in float64 over every token, one unpadded chunk at a time, full forward."""
    acc = {t: torch.zeros((64, 64), dtype=torch.float64) for t in targets}
    n = 0
    for c in chunks:
        store: dict = {}
        with torch.no_grad(), hooks([record_input(adapter.module(model, r, l), store, (r, l)) for r, l in targets]):
            model(input_ids=torch.tensor([c]))
        for t in targets:
            k = store[t][0].double()
            acc[t] += k.T @ k
        n += len(c)
    return {t: acc[t] / n for t in targets}, n


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_second_moments_match_direct_computation(model_factory, corpus_path, family):
    model, tok = model_factory(family)
    adapter = adapter_for(model)
    chunks = _chunks(corpus_path, tok)
    assert len(chunks) >= 4 and len({len(c) for c in chunks}) >= 2  # padding is exercised
    if family == "llama":
        assert all(c[0] == tok.bos_token_id for c in chunks) and max(map(len, chunks)) == MAX_LEN
    targets = [("mlp_out", 0), ("mlp_out", 2)]
    got = compute_second_moments(model, adapter, chunks, targets, batch_tokens=3 * MAX_LEN, progress=False)
    want, n = _direct(model, adapter, chunks, targets)
    assert n == sum(map(len, chunks))
    for t in targets:
        assert got[t].dtype == torch.float64 and got[t].shape == (64, 64)
        torch.testing.assert_close(got[t], want[t], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[t], got[t].T)  # symmetric
        assert torch.linalg.eigvalsh(got[t]).min() > -1e-9  # PSD
    assert not torch.allclose(got[targets[0]], got[targets[1]])


def test_attn_out_second_moment_and_batching_invariance(llama, corpus_path):
    model, tok = llama
    adapter = adapter_for(model)
    chunks = _chunks(corpus_path, tok)
    targets = [("attn_out", 1), ("mlp_out", 1)]
    one = compute_second_moments(model, adapter, chunks, targets, batch_tokens=1, progress=False)
    many = compute_second_moments(model, adapter, chunks, targets, batch_tokens=10_000, progress=False)
    for t in targets:
        torch.testing.assert_close(one[t], many[t], rtol=1e-5, atol=1e-8)
    store: dict = {}
    with torch.no_grad(), hooks([record_input(adapter.module(model, "attn_out", 1), store, "z")]):
        model(input_ids=torch.tensor([chunks[0]]))
    assert one[("attn_out", 1)].shape == (store["z"].shape[-1],) * 2


def test_chunks_respect_max_texts_and_lengths(tok, tok_nobos, corpus_path):
    all_chunks = _chunks(corpus_path, tok_nobos)
    assert all(len(c) <= MAX_LEN for c in all_chunks)
    lines = [ln.strip() for ln in corpus_path.read_text().splitlines() if ln.strip()]
    stream = tok_nobos("\n".join(lines), add_special_tokens=False)["input_ids"]  # lines joined by newlines
    assert [i for c in all_chunks for i in c] == stream  # nothing dropped, nothing repeated
    first = _chunks(corpus_path, tok_nobos, max_texts=1)
    assert [i for c in first for i in c] == tok_nobos(lines[0], add_special_tokens=False)["input_ids"]
    with_bos = _chunks(corpus_path, tok)
    assert all(c[0] == tok.bos_token_id and len(c) <= MAX_LEN for c in with_bos)


def test_empty_corpus_gives_a_clear_error(tok, tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no text"):
        _chunks(p, tok)


def test_too_short_covariance_window_is_rejected_by_hparams():
    from pipeline.editing.hparams import HParams, HParamsError

    with pytest.raises(HParamsError, match="cov_max_length"):
        HParams(layers=(1,), cov_max_length=1)


def test_missing_corpus(tmp_path):
    with pytest.raises(FileNotFoundError):
        Corpus.from_file(tmp_path / "none.txt")


# ------------------------------------------------------------------------------------ cache
def _run(model, tok, corpus_path, cache_dir, targets=(("mlp_out", 1), ("mlp_out", 2)), fp=None):
    adapter = adapter_for(model)
    return second_moments(model, tok, adapter, fp or model_fingerprint(model), Corpus.from_file(corpus_path),
                          list(targets), Cut(MAX_LEN), 64, "float32", cache_dir, progress=False)


def _no_compute(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("sharded_second_moments was called although the cache should serve")

    monkeypatch.setattr(cov_mod, "sharded_second_moments", fail)


def test_second_call_is_served_from_cache(llama, corpus_path, tmp_path, monkeypatch):
    model, tok = llama
    cache = tmp_path / "cache"
    first, ids = _run(model, tok, corpus_path, cache)
    files = sorted(cache.glob("*/*.safetensors"))
    assert sorted(p.stem for p in files) == sorted(ids.values()) and len(files) == 2
    assert sorted(p.parent.name for p in files) == ["mlp_out-1", "mlp_out-2"]
    _no_compute(monkeypatch)
    second, ids2 = _run(model, tok, corpus_path, cache)
    assert ids2 == ids
    for t in first:
        assert torch.equal(first[t], second[t])


def test_cache_partially_filled_computes_only_missing(llama, corpus_path, tmp_path, monkeypatch):
    model, tok = llama
    cache = tmp_path / "cache"
    _run(model, tok, corpus_path, cache, targets=[("mlp_out", 1)])
    calls = []
    real = cov_mod.sharded_second_moments

    def spy(model, tok, adapter, corpus, cut, summary, targets, *a, **k):
        calls.append(list(targets))
        return real(model, tok, adapter, corpus, cut, summary, targets, *a, **k)

    monkeypatch.setattr(cov_mod, "sharded_second_moments", spy)
    _run(model, tok, corpus_path, cache, targets=[("mlp_out", 1), ("mlp_out", 2)])
    assert calls == [[("mlp_out", 2)]]


def test_cache_key_depends_on_model_corpus_and_layer(llama, corpus_path, tmp_path):
    model, tok = llama
    _, ids = _run(model, tok, corpus_path, tmp_path / "c")
    _, ids_fp = _run(model, tok, corpus_path, tmp_path / "c", fp="other-model")
    assert set(ids.values()).isdisjoint(ids_fp.values())
    other = tmp_path / "other.txt"
    other.write_text(corpus_path.read_text() + "One more line.\n")
    _, ids_corpus = _run(model, tok, other, tmp_path / "c")
    assert set(ids.values()).isdisjoint(ids_corpus.values())
    assert ids[("mlp_out", 1)] != ids[("mlp_out", 2)]


def test_flipped_byte_is_rejected(llama, corpus_path, tmp_path, monkeypatch):
    model, tok = llama
    cache = tmp_path / "cache"
    _, ids = _run(model, tok, corpus_path, cache)
    path = cache / "mlp_out-2" / f"{ids[('mlp_out', 2)]}.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # inside the tensor data (the header is at the start)
    path.write_bytes(bytes(data))
    _no_compute(monkeypatch)
    with pytest.raises(CovarianceCacheError, match="content hash"):
        _run(model, tok, corpus_path, cache)


def test_entry_for_a_different_key_is_rejected(llama, corpus_path, tmp_path, monkeypatch):
    model, tok = llama
    cache = tmp_path / "cache"
    covs, ids = _run(model, tok, corpus_path, cache)
    path = cache / "mlp_out-1" / f"{ids[('mlp_out', 1)]}.safetensors"
    # overwrite with a well-formed entry whose recorded key differs (e.g. another layer)
    corpus = Corpus.from_file(corpus_path)
    wrong = cache_key(model_fingerprint(model), "mlp_out", 2, corpus, Cut(MAX_LEN), summarise(corpus, tok, Cut(MAX_LEN)),
                      "float32")
    save_entry(path, wrong, covs[("mlp_out", 2)])
    _no_compute(monkeypatch)
    with pytest.raises(CovarianceCacheError, match="different key"):
        _run(model, tok, corpus_path, cache)


def test_truncated_entry_is_rejected(tmp_path):
    key = {"format": 1, "layer": 0}
    path = tmp_path / f"{key_id(key)}.safetensors"
    save_entry(path, key, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(load_entry(path, key), torch.eye(3, dtype=torch.float64))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CovarianceCacheError, match="unreadable"):
        load_entry(path, key)


def test_entry_metadata_records_key(tmp_path):
    from safetensors import safe_open

    key = {"format": 1, "layer": 3, "role": "mlp_out"}
    path = tmp_path / "e.safetensors"
    save_entry(path, key, torch.ones(2, 2, dtype=torch.float64))
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["key"]) == key
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write leaves no temp file
