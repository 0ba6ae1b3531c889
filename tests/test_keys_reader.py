"""Keys read layer after layer, each read resumed where the last ended: same bits as full forwards."""

from __future__ import annotations

import copy

import pytest
import torch

import pipeline.editing.spread as spread_mod
from conftest import COUNTERFACT_RECORDS
from pipeline.editing.keys import PromptReader, RequestKeys, read_at_subject
from pipeline.requests import parse_requests
from pipeline.models.adapters import adapter_for
from test_engine_tiny import HP, _edit

PREFIXES = ["", "Some words here. ", "I"]


def _items(n=3):
    reqs = parse_requests(copy.deepcopy(COUNTERFACT_RECORDS[:n]))
    return [(p + r.prompt, r.subject) for r in reqs for p in PREFIXES]


def _mlp_calls(model, adapter):
    calls = {}
    for i in range(adapter.num_layers(model)):
        adapter.module(model, "mlp_out", i).register_forward_pre_hook(
            lambda *_a, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    return calls


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gemma3_text"])
def test_resumed_reads_equal_fresh_reads_while_layers_are_written(model_factory, family, monkeypatch):
    model, tok = model_factory(family)
    adapter = adapter_for(model)
    monkeypatch.setattr("pipeline.editing.keys.READ_BATCH", 4)  # several chunks, the last one short
    items = _items()
    reader = PromptReader(model, tok, adapter, items)
    calls = _mlp_calls(model, adapter)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in (0, 1, 2):
            calls.clear()
            got = reader.read("mlp_out", layer, "input")
            if layer:  # the blocks below the previous read were not run again
                assert set(calls) == {layer - 1, layer}, calls
            assert torch.equal(got, read_at_subject(model, tok, adapter, items, "mlp_out", layer, "input"))
            w = adapter.weight(model, "mlp_out", layer)
            w.add_(0.05 * torch.randn(w.shape, generator=gen))  # the spread writes the layer it read
        # a write below the kept states: the next read must start from the embeddings again
        adapter.weight(model, "mlp_out", 0).mul_(1.5)
        calls.clear()
        got = reader.read("attn_out", 2, "output")
        assert calls.get(0) == len(reader.chunks)
        assert torch.equal(got, read_at_subject(model, tok, adapter, items, "attn_out", 2, "output"))
        # a lower layer than the last read: also from the start
        assert torch.equal(reader.read("mlp_out", 1, "input"),
                           read_at_subject(model, tok, adapter, items, "mlp_out", 1, "input"))


class _FreshKeys(RequestKeys):
    """The spread as before: every read a full forward from the embeddings."""

    def __call__(self, role, layer):
        self.reader.entry, self.reader.states = 0, []
        return super().__call__(role, layer)


@pytest.mark.parametrize("family,method", [("llama", "pmet-attn-write"), ("gptj", "memit"), ("gemma3_text", "pmet")])
def test_spread_with_resumed_reads_writes_the_same_bits(model_factory, corpus_path, tmp_path, monkeypatch, family, method):
    model, tok = model_factory(family)
    resumed = _edit(model, tok, corpus_path, tmp_path, method, hp=HP)
    monkeypatch.setattr(spread_mod, "RequestKeys", _FreshKeys)
    fresh = _edit(model, tok, corpus_path, tmp_path, method, hp=HP)
    assert resumed.deltas.keys() == fresh.deltas.keys()
    for name in fresh.deltas:
        assert torch.equal(resumed.deltas[name], fresh.deltas[name]), name
