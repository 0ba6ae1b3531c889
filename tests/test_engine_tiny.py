"""``pipeline.edit`` end to end on tiny random models: what is written, exact replay, engines agree,
the optimised targets are approached, and the model is left alone unless asked."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import pipeline
import pipeline.editing.covariance as cov_mod
import pipeline.editing.driver as driver_mod
import pipeline.editing.engine as engine_mod
from conftest import COUNTERFACT_RECORDS
from pipeline import apply_deltas
from pipeline.editing.hparams import HParams, HParamsError
from pipeline.editing.keys import site_values
from pipeline.editing.methods import MethodError, get_method
from pipeline.editing.solvers import SOLVERS, Solver
from pipeline.requests import RequestError, parse_requests
from pipeline.evaluation.scoring import score_pairs
from pipeline.models.adapters import AdapterError, adapter_for

LAYERS = (1, 2)
HP = HParams(layers=LAYERS, v_num_grad_steps=6, v_lr=0.5, mom2_update_weight=100.0, loss_stop=1e-6,
             context_starters=("The", "I"), context_length=3, cov_max_length=32)

CASES = [("llama", m) for m in ("memit", "pmet", "pmet-mlp-only", "pmet-attn-write", "pmet-even")] + [
    ("gpt2", "pmet"), ("gpt2", "pmet-attn-write"), ("gptj", "pmet"), ("gpt_neox", "pmet"), ("gemma3_text", "pmet"),
    ("gptj", "memit"),
]


def _records(n=3):
    return copy.deepcopy(COUNTERFACT_RECORDS[:n])


def _edit(model, tok, corpus, cache, method="pmet", hp=HP, **kw):
    return pipeline.edit(model, tok, _records(), method=method, hparams=hp, corpus=corpus, cache_dir=cache,
                         progress=False, **kw)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    changed = [k for k in state if not torch.equal(now[k], state[k])]
    assert not changed, f"parameters changed: {changed}"


def _expected_names(model, method):
    adapter = adapter_for(model)
    spec = get_method(method)
    return {adapter.parameter_name(role, layer) for layer in LAYERS for r in spec.regions for role, _ in r.writes}


@pytest.fixture
def capture_values(monkeypatch):
    """Record the ValueResult that edit() optimised (targets are not part of EditResult)."""
    box = {}
    real = driver_mod.optimise_targets

    def spy(*args, **kwargs):
        box["values"] = real(*args, **kwargs)
        return box["values"]

    monkeypatch.setattr(driver_mod, "optimise_targets", spy)
    return box


# ------------------------------------------------------------------------------------ what is written
@pytest.mark.parametrize("family,method", CASES)
def test_edit_writes_expected_parameters_and_leaves_model_alone(model_factory, corpus_path, tmp_path, family, method):
    model, tok = model_factory(family)
    before = _state(model)
    res = _edit(model, tok, corpus_path, tmp_path, method)
    _assert_same_state(model, before)
    assert res.applied is False and res.method == method
    assert set(res.deltas) == _expected_names(model, method)
    params = dict(model.named_parameters())
    for name, d in res.deltas.items():
        assert d.shape == params[name].shape and d.dtype == params[name].dtype
        assert torch.isfinite(d).all() and float(d.norm()) > 0
    assert res.steps == [HP.v_num_grad_steps] * 3
    assert res.prefixes[0] == "" and len(res.prefixes) == 1 + len(HP.context_starters)
    spec = get_method(method)
    writes = [w for r in spec.regions for w in r.writes]
    assert set(res.covariance_ids) == {f"{role}@{layer}" for layer in LAYERS for role, _ in writes}
    # one layer row per written (layer, role), lowest layer first, with the method's divisor
    assert [(r["layer"], r["role"]) for r in res.layers] == [(l, role) for l in LAYERS for role, _ in writes]
    for r in res.layers:
        remaining = len(LAYERS) - LAYERS.index(r["layer"])
        assert r["divisor"] == pytest.approx(remaining if spec.regions[0].spread == "even" else math.sqrt(remaining))
    assert {row["request"] for row in res.traces} == {0, 1, 2}


def test_training_mode_and_grad_flags_are_restored(llama, corpus_path, tmp_path):
    model, tok = llama
    model.train()
    model.requires_grad_(True)
    adapter_for(model).module(model, "mlp_out", 0).weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    before = _state(model)
    _edit(model, tok, corpus_path, tmp_path)
    assert model.training is True
    assert [p.requires_grad for p in model.parameters()] == flags
    _assert_same_state(model, before)


# ------------------------------------------------------------------------------------ exact replay
@pytest.mark.parametrize("family,method", CASES + [("gemma3_text", "memit")])
def test_apply_equals_base_plus_deltas_bit_exactly(model_factory, corpus_path, tmp_path, family, method):
    model, tok = model_factory(family)
    base = _state(model)
    res = _edit(model, tok, corpus_path, tmp_path, method, apply=True)
    assert res.applied is True
    edited = model.state_dict()
    for name in base:
        if name in res.deltas:
            assert torch.equal(edited[name], base[name] + res.deltas[name]), name
            assert not torch.equal(edited[name], base[name])
        else:
            assert torch.equal(edited[name], base[name]), name
    fresh, _ = model_factory(family)
    apply_deltas(fresh, res.deltas)
    _assert_same_state(fresh, {k: v.clone() for k, v in edited.items()})
    # a second, non-applied edit of the base gives the very same deltas (deterministic pipeline)
    again, _ = model_factory(family)
    res2 = _edit(again, tok, corpus_path, tmp_path, method)
    assert res2.deltas.keys() == res.deltas.keys()
    for name in res.deltas:
        assert torch.equal(res2.deltas[name], res.deltas[name]), name
    # undo
    apply_deltas(fresh, res.deltas, sign=-1)
    for name in res.deltas:
        torch.testing.assert_close(fresh.state_dict()[name], base[name], atol=1e-6, rtol=0)


def test_apply_deltas_rejects_bad_deltas(llama):
    model, _ = llama
    with pytest.raises(KeyError, match="unknown parameter"):
        apply_deltas(model, {"model.layers.9.mlp.down_proj.weight": torch.zeros(1)})
    name = adapter_for(model).parameter_name("mlp_out", 1)
    with pytest.raises(ValueError, match="shape"):
        apply_deltas(model, {name: torch.zeros(3, 3)})


# ------------------------------------------------------------------------------------ engines agree
@pytest.mark.parametrize("family,method", CASES)
def test_fast_and_reference_engines_agree(model_factory, corpus_path, tmp_path, family, method):
    model, tok = model_factory(family)
    fast = _edit(model, tok, corpus_path, tmp_path, method, engine="fast")
    ref = _edit(model, tok, corpus_path, tmp_path, method, engine="reference")
    assert fast.deltas.keys() == ref.deltas.keys()
    for name in fast.deltas:
        err = float((fast.deltas[name] - ref.deltas[name]).norm())
        assert err <= 1e-3 * float(ref.deltas[name].norm()), (name, err)
    assert fast.steps == ref.steps
    assert [r["request"] for r in ref.traces] == sorted(r["request"] for r in ref.traces)
    assert len(fast.traces) == len(ref.traces)


# ------------------------------------------------------------------------------------ targets approached
@pytest.mark.parametrize("family,method", CASES)
def test_written_targets_are_approached(model_factory, corpus_path, tmp_path, capture_values, family, method):
    model, tok = model_factory(family)
    adapter = adapter_for(model)
    reqs = parse_requests(_records())
    res = _edit(model, tok, corpus_path, tmp_path, method, apply=True)
    values = capture_values["values"]
    last = LAYERS[-1]
    spec = get_method(method)
    assert set(values.targets) == set(spec.sites)
    # before the first write the gap is exactly δ (the first rewriting prompt is the bare prompt)
    first = res.layers[0]
    gap0 = float(values.deltas[first["site"]].norm(dim=-1).mean())
    assert first["target_gap_norm"] == pytest.approx(gap0, rel=1e-4)
    for _, site in (w for r in spec.regions for w in r.writes):
        now = site_values(model, tok, adapter, reqs, site, last)
        before = values.deltas[site].norm(dim=-1)  # ‖target − value of the unedited model‖
        after = (values.targets[site] - now).norm(dim=-1)
        assert (after < 0.9 * before).all(), (site, after / before)


def test_memit_edit_raises_target_probability(llama, corpus_path, tmp_path):
    model, tok = llama
    reqs = parse_requests(_records())
    pairs = [(r.text, r.target_new) for r in reqs]
    before = score_pairs(model, tok, pairs).mean_logprob
    _edit(model, tok, corpus_path, tmp_path, "memit", hp=HP.replace(mom2_update_weight=1.0), apply=True)
    after = score_pairs(model, tok, pairs).mean_logprob
    assert float((after - before).mean()) > 0.01, (after - before)


# ------------------------------------------------------------------------------------ covariance reuse
def test_covariance_is_shared_between_methods(llama, corpus_path, tmp_path, monkeypatch):
    model, tok = llama
    res1 = _edit(model, tok, corpus_path, tmp_path, "pmet")
    assert len(list(tmp_path.glob("*/*.safetensors"))) == len(LAYERS)

    def fail(*a, **k):
        raise AssertionError("covariance recomputed although cached")

    monkeypatch.setattr(cov_mod, "accumulate", fail)
    res2 = _edit(model, tok, corpus_path, tmp_path, "memit")
    assert res2.covariance_ids == res1.covariance_ids


# ------------------------------------------------------------------------------------ failures
def test_failure_during_spread_restores_the_model(llama, corpus_path, tmp_path, monkeypatch):
    model, tok = llama
    before = _state(model)
    calls = {"n": 0}
    real = SOLVERS["closed_form"].solve

    def second_fails(*a, **k):
        calls["n"] += 1
        out, info = real(*a, **k)
        return (out * float("nan") if calls["n"] == 2 else out), info

    monkeypatch.setitem(SOLVERS, "closed_form", Solver(second_fails))
    with pytest.raises(FloatingPointError, match="non-finite update at layer 2"):
        _edit(model, tok, corpus_path, tmp_path, "pmet", apply=True)
    assert calls["n"] == 2
    _assert_same_state(model, before)  # the layer-1 write was rolled back although apply=True
    for m in model.modules():  # no hook left behind
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_edit_leaves_global_rng_alone_and_prefixes_are_seeded(llama, corpus_path, tmp_path):
    model, tok = llama
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = _edit(model, tok, corpus_path, tmp_path)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    b = _edit(model, tok, corpus_path, tmp_path)
    assert a.prefixes == b.prefixes
    c = _edit(model, tok, corpus_path, tmp_path, hp=HP.replace(context_seed=1))
    assert c.prefixes != a.prefixes


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(method="rome"), MethodError, "unknown method 'rome'"),
        (dict(hparams=None), HParamsError, "hparams are required"),
        (dict(hparams="pmet"), HParamsError, "must be an HParams or a dict"),
        (dict(engine="turbo"), ValueError, "unknown engine"),
        (dict(hparams=HP.replace(layers=[2, 4])), AdapterError, "layer 4 out of range"),
    ],
)
def test_bad_arguments_fail_before_model_work(llama, corpus_path, tmp_path, monkeypatch, kwargs, error, match):
    model, tok = llama

    def fail(*a, **k):
        raise AssertionError("model work started")

    monkeypatch.setattr(engine_mod, "second_moments", fail)
    args = dict(method="pmet", hparams=HP, corpus=corpus_path, cache_dir=tmp_path, progress=False) | kwargs
    with pytest.raises(error, match=match):
        pipeline.edit(model, tok, _records(), **args)


def test_bad_requests_fail_before_model_work(llama, corpus_path, tmp_path, monkeypatch):
    model, tok = llama
    monkeypatch.setattr(engine_mod, "second_moments", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work")))
    recs = _records()
    with pytest.raises(RequestError, match="duplicate"):
        pipeline.edit(model, tok, recs + recs[:1], method="pmet", hparams=HP, corpus=corpus_path, cache_dir=tmp_path)
    reqs = parse_requests(_records())
    with pytest.raises(RequestError, match="conflicts"):
        pipeline.edit(model, tok, reqs + [reqs[0].__class__(**{**reqs[0].canonical(), "target_new": "Latin"})],
                      method="pmet", hparams=HP, corpus=corpus_path, cache_dir=tmp_path)
    with pytest.raises(RequestError, match="no requests"):
        pipeline.edit(model, tok, [], method="pmet", hparams=HP, corpus=corpus_path, cache_dir=tmp_path)


def test_edit_accepts_parsed_requests_and_dict_hparams(llama, corpus_path, tmp_path):
    model, tok = llama
    a = _edit(model, tok, corpus_path, tmp_path, "pmet")
    b = pipeline.edit(model, tok, parse_requests(_records()), method="pmet", hparams=HP.to_dict(), corpus=corpus_path,
                      cache_dir=tmp_path, progress=False)
    for name in a.deltas:
        assert torch.equal(a.deltas[name], b.deltas[name])


# ------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_score_pairs_matches_manual_teacher_forcing(model_factory, family):
    import torch.nn.functional as F

    model, tok = model_factory(family)
    pairs = [("The mother tongue of Danielle Darrieux is", "English"), ("Toko Yasuda, who plays", "the piano"),
             ("I", "Madrid is located in Spain"), ("Rome", " France")]
    sc = score_pairs(model, tok, pairs, batch_size=3)
    for i, (p, a) in enumerate(pairs):
        pi = tok(p)["input_ids"]
        ai = tok(a if a[:1].isspace() else " " + a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = F.log_softmax(model(input_ids=torch.tensor([pi + ai])).logits[0].float(), -1)
        tok_lp = torch.stack([lp[len(pi) - 1 + t, x] for t, x in enumerate(ai)])
        assert int(sc.n_tokens[i]) == len(ai)
        assert float(sc.mean_logprob[i]) == pytest.approx(float(tok_lp.mean()), abs=1e-5)
        argmax = [int(lp[len(pi) - 1 + t].argmax()) == x for t, x in enumerate(ai)]
        assert float(sc.token_correct[i]) == pytest.approx(sum(argmax) / len(ai))
    one = score_pairs(model, tok, pairs, batch_size=1)
    torch.testing.assert_close(one.mean_logprob, sc.mean_logprob, atol=1e-5, rtol=0)


def test_counterfact_evaluation_semantics(llama):
    from pipeline.evaluation.protocols import evaluate

    model, tok = llama
    reqs = parse_requests(copy.deepcopy(COUNTERFACT_RECORDS))
    metrics, df = evaluate(model, tok, reqs)
    neigh = df["kind"] == "neighborhood"
    assert ((df["success"] == (df["logp_new"] > df["logp_true"])) | neigh).all()
    assert ((df["success"] == (df["logp_true"] > df["logp_new"])) | ~neigh).all()
    rewrite = df[df["kind"] == "rewrite"].groupby("request")["success"].mean().mean()
    assert metrics["efficacy"] == pytest.approx(rewrite)
    assert metrics["n_requests"] == len(reqs)
    assert set(df["kind"]) == {"rewrite", "paraphrase", "neighborhood"}


# ------------------------------------------------------------------------------------ compute dtypes
@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_bfloat16_value_optimisation_targets_the_float32_model(llama, corpus_path, tmp_path, capture_values, engine):
    """With ``v_dtype: bfloat16`` δ is optimised on a cast copy, kept in float32, and the target
    is the float32 model's own value + δ; the model itself is never cast."""
    model, tok = llama
    hp = HP.replace(v_dtype="bfloat16")
    state = _state(model)
    res = _edit(model, tok, corpus_path, tmp_path, hp=hp, engine=engine)
    _assert_same_state(model, state)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    values = capture_values["values"]
    reqs = parse_requests(_records())
    for site, delta in values.deltas.items():
        assert delta.dtype == torch.float32
        own = site_values(model, tok, adapter_for(model), reqs, site, LAYERS[-1])
        assert torch.equal(values.targets[site], own + delta)
    ref = _edit(model, tok, corpus_path, tmp_path, hp=HP, engine=engine)
    for name in ref.deltas:  # a bfloat16 forward is a perturbation of the float32 one, not another edit
        cos = torch.nn.functional.cosine_similarity(res.deltas[name].flatten(), ref.deltas[name].flatten(), dim=0)
        assert cos > 0.9, (name, float(cos))


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_eager_attention_is_an_exchangeable_kernel(model_factory, corpus_path, tmp_path, family):
    """``v_attention: eager`` changes only the kernel of value optimisation: the engines still agree
    with each other, the deltas stay those of the model's own (SDPA) kernel up to rounding, and the
    model, which float32 optimisation uses directly, gets its own attention back."""
    model, tok = model_factory(family)
    own = model.config._attn_implementation
    assert own == "sdpa" and model._can_set_attn_implementation()
    eager = HP.replace(v_attention="eager")
    fast = _edit(model, tok, corpus_path, tmp_path, hp=eager)
    assert model.config._attn_implementation == own
    ref = _edit(model, tok, corpus_path, tmp_path, hp=eager, engine="reference")
    sdpa = _edit(model, tok, corpus_path, tmp_path, hp=HP)
    for name in fast.deltas:
        for other in (ref, sdpa):
            err = float((fast.deltas[name] - other.deltas[name]).norm())
            assert err <= 1e-3 * float(other.deltas[name].norm()), (name, err)
    assert any(not torch.equal(fast.deltas[n], sdpa.deltas[n]) for n in fast.deltas)  # another kernel did run
    assert fast.steps == ref.steps == sdpa.steps


def test_bfloat16_covariance_is_close_and_cached_separately(llama, corpus_path, tmp_path):
    from pipeline.corpus import Corpus, Cut
    from pipeline.editing.covariance import second_moments
    from pipeline.models.loading import model_fingerprint

    model, tok = llama
    adapter, fp, corpus = adapter_for(model), model_fingerprint(model), Corpus.from_file(corpus_path)
    args = (model, tok, adapter, fp, corpus, [("mlp_out", 1)], Cut(32), 256)
    c32, id32 = second_moments(*args, "float32", tmp_path, progress=False)
    c16, id16 = second_moments(*args, "bfloat16", tmp_path, progress=False)
    assert id32 != id16
    assert c16[("mlp_out", 1)].dtype == torch.float64
    rel = (c16[("mlp_out", 1)] - c32[("mlp_out", 1)]).norm() / c32[("mlp_out", 1)].norm()
    assert 0 < rel < 0.05, float(rel)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_unknown_compute_dtype_is_rejected():
    with pytest.raises(HParamsError, match="v_dtype must be one of"):
        HP.replace(v_dtype="int8")
    with pytest.raises(HParamsError, match="v_attention must be one of"):
        HP.replace(v_attention="flash")
    with pytest.raises(HParamsError, match="cov_dtype must be one of"):
        HP.replace(cov_dtype="half")
