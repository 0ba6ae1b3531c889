"""The probes on tiny models: shapes, agreement with the model's own forward, known values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import COUNTERFACT_RECORDS
from pipeline.tokens import encode_with_subject, target_ids
from pipeline.models.adapters import adapter_for
from pipeline.probes.capture import capture_states, logit_lens
from pipeline.probes.logit_lens import contrast_logit_lens, rank_of
from pipeline.probes.similarity import component_similarity, jaccard_topk

ITEMS = [("The mother tongue of {} is", "Danielle Darrieux", "French", "English"),
         ("{}, who plays", "Toko Yasuda", "the guitar", "the piano"),
         ("{}, which is located in", "Autonomous University of Madrid", "Spain", "Sweden")]


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gemma3_text"])
def test_captured_states_match_the_models_hidden_states(model_factory, family):
    model, tok = model_factory(family)
    adapter = adapter_for(model)
    st = capture_states(model, tok, adapter, [(t, s) for t, s, _, _ in ITEMS], batch_size=2)
    n_layers = adapter.num_layers(model)
    assert st.h_in.shape == st.h_mid.shape == st.h_out.shape == (n_layers, len(ITEMS), 2, model.config.get_text_config().hidden_size)
    for i, (t, s, _, _) in enumerate(ITEMS):
        e = encode_with_subject(tok, t, s)
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([e.ids]), output_hidden_states=True).hidden_states
        for layer in range(n_layers - 1):  # the last entry of hidden_states is after the final norm
            for p, pos in enumerate((e.subject_last, len(e.ids) - 1)):
                torch.testing.assert_close(st.h_out[layer, i, p], hs[layer + 1][0, pos], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(st.h_in[layer, i, p], hs[layer][0, pos], atol=1e-4, rtol=1e-4)
    # the last layer's logit lens is the model's own next-token distribution
    lens = logit_lens(model, adapter, st.h_out[-1, :, 1])
    for i, (t, s, _, _) in enumerate(ITEMS):
        ids = encode_with_subject(tok, t, s).ids
        with torch.no_grad():
            want = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        torch.testing.assert_close(lens[i], want, atol=1e-4, rtol=1e-4)


def test_similarity_known_values_and_shapes(llama):
    model, tok = llama
    adapter = adapter_for(model)
    items = [(t, s) for t, s, _, _ in ITEMS]
    df = component_similarity(model, tok, items)
    n_layers = adapter.num_layers(model)
    assert len(df) == len(items) * n_layers * 2
    assert set(df["component"]) == {"attention", "mlp"}
    assert df["cosine"].between(-1 - 1e-6, 1 + 1e-6).all() and df["jaccard_top50"].between(0, 1).all()
    assert (df["cosine"] < 0.9999).any()  # a random model's components do change the state
    # with layer 1's attention output projection zeroed, attention changes nothing there: cosine 1, Jaccard 1
    with torch.no_grad():
        adapter.module(model, "attn_out", 1).weight.zero_()
    df0 = component_similarity(model, tok, items)
    att1 = df0[(df0["component"] == "attention") & (df0["layer"] == 1)]
    assert att1["cosine"].tolist() == pytest.approx([1.0] * len(items), abs=1e-6)
    assert att1["jaccard_top50"].tolist() == [1.0] * len(items)


def test_jaccard_topk_known_values():
    a = torch.tensor([[5.0, 4, 3, 2, 1, 0]])
    assert float(jaccard_topk(a, a, 3)) == 1.0
    assert float(jaccard_topk(a, -a, 3)) == 0.0
    b = torch.tensor([[5.0, 4, 0, 3, 1, 2]])  # top-3 {0,1,3} vs {0,1,2}: 2 shared of 4
    assert float(jaccard_topk(a, b, 3)) == pytest.approx(0.5)


def test_contrast_logit_lens_shapes_and_values(gpt2):
    model, tok = gpt2
    adapter = adapter_for(model)
    df = contrast_logit_lens(model, tok, ITEMS, record_ids=[10, 11, 12])
    n_layers = adapter.num_layers(model)
    assert len(df) == len(ITEMS) * n_layers * 2 * 2
    assert set(df["record"]) == {10, 11, 12} and set(df["position"]) == {"subject_last", "prediction"}
    assert df["prob"].between(0, 1).all() and (df["rank"] >= 0).all()
    # the last layer at the prediction token is the model's own prediction of the answers' first tokens
    for i, (t, s, orig, new) in enumerate(ITEMS):
        ids = encode_with_subject(tok, t, s).ids
        with torch.no_grad():
            p = F.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        for name, ans in (("original", orig), ("target", new)):
            row = df[(df["record"] == 10 + i) & (df["layer"] == n_layers - 1) & (df["position"] == "prediction")
                     & (df["answer"] == name)].iloc[0]
            tid = target_ids(tok, ans)[0]
            assert row["prob"] == pytest.approx(float(p[tid]), abs=1e-5)
            assert row["rank"] == int((p > p[tid]).sum())


def test_rank_of():
    lp = torch.tensor([[0.1, 0.5, 0.2, 0.5], [3.0, 2.0, 1.0, 0.0]])
    assert rank_of(lp, torch.tensor([1, 0])).tolist() == [0, 0]
    assert rank_of(lp, torch.tensor([0, 3])).tolist() == [3, 3]


def test_probe_command_writes_parquet_and_png(llama, tmp_path):
    import pandas as pd

    from pipeline.stages.probes import ProbeError, run_probe

    model, tok = llama
    recs = COUNTERFACT_RECORDS[:3]
    for kind, name in (("similarity", "similarity"), ("logit-lens", "logit_lens")):
        path = run_probe(kind, model, tok, recs, tmp_path)
        assert path == tmp_path / f"{name}.parquet"
        assert len(pd.read_parquet(path)) > 0
        png = (tmp_path / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ProbeError, match="unknown probe"):
        run_probe("tracing", model, tok, recs, tmp_path)


def test_promotion_window_finds_the_layers_where_the_contrast_grows():
    import math

    import pandas as pd

    from pipeline.probes.choose import contrast_curve, promotion_window

    # contrast log P(o) − log P(o*) per layer: flat, then a jump over layers 6-8, then flat, last two drop
    contrast = [0, 0, 0, 0, 0, 0.1, 1.0, 2.0, 3.0, 3.1, 3.1, 2.0, 1.0]
    rows = []
    for rec in (0, 1):
        for layer, c in enumerate(contrast):
            rows.append({"record": rec, "layer": layer, "position": "prediction", "answer": "original",
                         "prob": math.exp(-1.0), "rank": 0})
            rows.append({"record": rec, "layer": layer, "position": "prediction", "answer": "target",
                         "prob": math.exp(-1.0 - c), "rank": 5})
    df = pd.DataFrame(rows)
    assert contrast_curve(df).tolist() == pytest.approx(contrast)
    layers, growth = promotion_window(df, width=3, above=2)
    assert layers == [6, 7, 8]
    assert growth[6] == pytest.approx(3.0 - 0.1)
    assert max(growth.index) + 2 <= len(contrast) - 2  # the last two layers are never chosen
    with pytest.raises(ValueError, match="no window"):
        promotion_window(df, width=3, above=9)
