"""JEEP (two regions, joint optimisation, two spreads) and its ablations, iterative editing and
neighbour-assisted editing, on tiny random models."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import pipeline
import pipeline.editing.driver as driver_mod
import pipeline.editing.engine as engine_mod
from conftest import COUNTERFACT_RECORDS
from pipeline import apply_deltas
from pipeline.editing.hparams import HParams, HParamsError
from pipeline.editing.driver import Optimise, Replay, drive, plan
from pipeline.editing.keys import site_values
from pipeline.editing.methods import METHODS, MethodError, get_method
from pipeline.editing.neighbors import select_neighbors
from pipeline.requests import parse_requests
from pipeline.tokens import target_ids
from pipeline.editing.problem import ValueProblem
from pipeline.evaluation.protocols import evaluate
from pipeline.evaluation.scoring import score_pairs
from pipeline.ledger.entry import edit_content, entry_id
from pipeline.models.adapters import adapter_for

LOW, HIGH = (0, 1), (2, 3)
HP = HParams(layers=LOW, high_layers=HIGH, v_num_grad_steps=6, v_lr=0.5, mom2_update_weight=100.0, loss_stop=1e-6,
             clamp_norm_factor=3.0, high_clamp_norm_factor=0.5, context_starters=("The",), context_length=3,
             cov_max_length=32)
PMET_HP = HParams(layers=(1, 2), v_num_grad_steps=5, v_lr=0.5, mom2_update_weight=100.0, loss_stop=1e-6,
                  clamp_norm_factor=3.0, context_starters=("The",), context_length=3, cov_max_length=32)
JEEP_METHODS = [m for m in METHODS if m.startswith("jeep")]


def _records(n=3):
    return copy.deepcopy(COUNTERFACT_RECORDS[:n])


def _edit(model, tok, corpus, cache, method="jeep", hp=HP, records=None, **kw):
    return pipeline.edit(model, tok, records or _records(), method=method, hparams=hp, corpus=corpus, cache_dir=cache,
                         progress=False, **kw)


@pytest.fixture
def capture_values(monkeypatch):
    box = {"values": []}
    real = driver_mod.optimise_targets

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        box["values"].append(out)
        return out

    monkeypatch.setattr(driver_mod, "optimise_targets", spy)
    return box


# ------------------------------------------------------------------------------------------ JEEP
def test_jeep_joint_optimisation_reaches_both_targets_with_the_two_spreads(llama, corpus_path, tmp_path, capture_values):
    model, tok = llama
    adapter = adapter_for(model)
    reqs = parse_requests(_records())
    base = copy.deepcopy(model)
    res = _edit(model, tok, corpus_path, tmp_path, "jeep", apply=True)
    (values,) = capture_values["values"]
    assert set(values.targets) == {"mlp", "pred_residual"}  # one optimisation, both regions together
    # writes: the MLPs of both regions
    assert set(res.deltas) == {adapter.parameter_name("mlp_out", l) for l in LOW + HIGH}
    # step 2 then step 3, each lowest layer first; sqrt spread low, even spread high
    assert [(r["region"], r["layer"]) for r in res.layers] == [("low", 0), ("low", 1), ("high", 2), ("high", 3)]
    assert [r["divisor"] for r in res.layers] == pytest.approx([math.sqrt(2), 1.0, 2.0, 1.0])
    # clamps: ‖δ'‖ ≤ γ'‖m^{L'}‖ and ‖δ*‖ ≤ γ*‖h^{L*}‖ (each relative to its own state)
    for site, gamma in (("mlp", HP.clamp_norm_factor), ("pred_residual", HP.high_clamp_norm_factor)):
        assert (values.deltas[site].norm(dim=-1) <= gamma * values.init[site].norm(dim=-1) + 1e-5).all()
        assert (values.deltas[site].norm(dim=-1) > 0).all()
    # init of the high site is the unedited residual at the *prediction* token of L*
    torch.testing.assert_close(values.init["pred_residual"],
                               site_values(base, tok, adapter, reqs, "pred_residual", HIGH[-1]),
                               atol=1e-5, rtol=1e-5)
    # after the spreads both regions' written values moved towards their targets
    for site, layer in (("mlp", LOW[-1]), ("pred_residual", HIGH[-1])):
        now = site_values(model, tok, adapter, reqs, site, layer)
        before = values.deltas[site].norm(dim=-1)
        after = (values.targets[site] - now).norm(dim=-1)
        assert (after < 0.9 * before).all(), (site, after / before)
    # the target NLL fell (the loss adds the weight decay, 0 at step 0): both vectors at work
    first = {r["request"]: r["nll"] for r in res.traces if r["step"] == 0}
    last = {r["request"]: r["nll"] for r in res.traces}
    assert all(last[i] < first[i] for i in first)


def test_jeep_fast_and_reference_engines_agree(llama, corpus_path, tmp_path):
    model, tok = llama
    fast = _edit(model, tok, corpus_path, tmp_path, "jeep", engine="fast")
    ref = _edit(model, tok, corpus_path, tmp_path, "jeep", engine="reference")
    for name in fast.deltas:
        err = float((fast.deltas[name] - ref.deltas[name]).norm())
        assert err <= 1e-3 * float(ref.deltas[name].norm()), (name, err)


@pytest.mark.parametrize("method", JEEP_METHODS)
def test_jeep_ablations_write_what_they_say(llama, corpus_path, tmp_path, capture_values, method):
    model, tok = llama
    adapter = adapter_for(model)
    spec = get_method(method)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = _edit(model, tok, corpus_path, tmp_path, method)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # not applied
    expected = {"jeep": {("mlp_out", l) for l in LOW + HIGH},
                "jeep-low-only": {("mlp_out", l) for l in LOW},
                "jeep-high-only": {("mlp_out", l) for l in HIGH},
                "jeep-no-step3": {("mlp_out", l) for l in LOW},
                "jeep-no-step2": {("mlp_out", l) for l in HIGH},
                "jeep-separate": {("mlp_out", l) for l in LOW + HIGH},
                "jeep-even": {("mlp_out", l) for l in LOW + HIGH},
                "jeep-attn-high": {("mlp_out", l) for l in LOW} | {("attn_out", l) for l in HIGH}}[method]
    assert set(res.deltas) == {adapter.parameter_name(r, l) for r, l in expected}
    assert all(float(d.norm()) > 0 for d in res.deltas.values())
    optimised = [set(v.targets) for v in capture_values["values"]]
    if method == "jeep-separate":  # low first, then high on the updated weights
        assert optimised == [{"mlp"}, {"pred_residual"}]
        assert {r["pass"] for r in res.traces} == {0, 1}
    else:
        assert optimised == [set(spec.sites)]
    low_div = [r["divisor"] for r in res.layers if r.get("region") == "low"]
    if low_div:
        assert low_div == pytest.approx([2.0, 1.0] if method == "jeep-even" else [math.sqrt(2), 1.0])
    high_div = [r["divisor"] for r in res.layers if r.get("region") == "high"]
    high_writes = [w for r in spec.regions if r.name == "high" for w in r.writes]
    assert high_div == ([2.0, 1.0] if high_writes else [])  # even spread in step 3


def test_separate_and_joint_optimisation_differ(llama, corpus_path, tmp_path):
    model, tok = llama
    joint = _edit(model, tok, corpus_path, tmp_path, "jeep")
    sep = _edit(model, tok, corpus_path, tmp_path, "jeep-separate")
    high = adapter_for(model).parameter_name("mlp_out", HIGH[0])
    assert not torch.allclose(joint.deltas[high], sep.deltas[high])


@pytest.mark.parametrize(
    "hp,match",
    [
        (HP.replace(high_layers=[]), "needs high_layers"),
        (HP.replace(high_clamp_norm_factor=3.0), "γ' > γ\\*"),
        (HP.replace(high_layers=[2, 7]), "layer 7 out of range"),
    ],
)
def test_jeep_bad_settings_fail_before_model_work(llama, corpus_path, tmp_path, monkeypatch, hp, match):
    model, tok = llama
    monkeypatch.setattr(engine_mod, "second_moments", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work")))
    with pytest.raises(Exception, match=match):
        _edit(model, tok, corpus_path, tmp_path, "jeep", hp=hp)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(high_layers=[1, 2]), "must lie above"),
        (dict(high_layers=[3, 2]), "strictly increasing"),
        (dict(neighbors=-1), "neighbors must be"),
        (dict(neighbors=11), "neighbors must be"),
        (dict(max_iterations=0), "max_iterations"),
        (dict(iteration_epsilon=0), "iteration_epsilon"),
        (dict(iterative="yes"), "iterative must be true or false"),
        (dict(high_clamp_norm_factor=float("nan")), "high_clamp_norm_factor"),
    ],
)
def test_bad_modifier_and_region_values_are_rejected(change, match):
    with pytest.raises(HParamsError, match=match):
        HP.replace(**change)


def test_method_specs_are_checked():
    with pytest.raises(MethodError, match="unknown method 'jeep-turbo'"):
        get_method("jeep-turbo")
    from pipeline.editing.methods import Method, RegionSpec

    low = RegionSpec("low", "subject", ("mlp",), (("mlp_out", "mlp"),), "sqrt")
    with pytest.raises(MethodError, match="cannot write"):
        Method("x", (low, RegionSpec("high", "prediction", ("pred_residual",), (("mlp_out", "mlp"),), "even")), "jeep", "")
    with pytest.raises(MethodError, match="separate optimisation"):
        Method("x", (low, RegionSpec("high", "prediction", ("pred_residual",), (), "even")), "jeep", "", joint=False)
    assert [len(plan(get_method(m), HP)) for m in ("pmet", "jeep", "jeep-separate")] == [1, 1, 2]


def test_modifiers_are_hashed_but_defaults_keep_old_hashes():
    d = PMET_HP.to_dict()
    assert not {"iterative", "neighbors", "high_layers", "max_iterations"} & set(d)  # old entries keep their ids
    assert HParams.from_dict(d) == PMET_HP
    it = PMET_HP.replace(iterative=True)
    nb = PMET_HP.replace(neighbors=2)
    assert it.to_dict()["iterative"] is True and nb.to_dict()["neighbors"] == 2
    ids = {entry_id(edit_content(None, "f" * 64, parse_requests(_records(1)), "pmet", h, {}))
           for h in (PMET_HP, it, nb, PMET_HP.replace(neighbors=2, neighbor_prefixes=True))}
    assert len(ids) == 4
    assert it.modifiers == {"iterative": {"max_iterations": 10, "epsilon": 1.0}}
    assert (PMET_HP.modifier_label, it.modifier_label, nb.modifier_label) == ("", "+iterative", "+na2")
    assert it.replace(neighbors=1, neighbor_prefixes=True).modifier_label == "+iterative+nap1"


# ------------------------------------------------------------------------------------------ iterative
def test_iterative_stopping_rule_and_recorded_trace(llama, corpus_path, tmp_path):
    model, tok = llama
    never = _edit(model, tok, corpus_path, tmp_path, "pmet", hp=PMET_HP.replace(iterative=True, max_iterations=3,
                                                                            iteration_epsilon=1e-12))
    assert [r["iteration"] for r in never.iterations] == [0, 1, 2]
    for k, r in enumerate(never.iterations):
        assert r["abs_delta_p"] == pytest.approx(abs(r["p_updated"] - r["p_optimised"]))
        assert r["stopped"] is (r["abs_delta_p"] <= 1e-12)
        if k:  # iteration k starts on the weights iteration k-1 ended with
            assert r["p_start"] == never.iterations[k - 1]["p_updated"]
    assert never.iterations[0]["p_updated"] < never.iterations[0]["p_start"]  # the edit lowered the perplexity
    assert sorted({r["iteration"] for r in never.traces}) == [0, 1, 2]
    assert never.steps == [sum(1 for r in never.traces if r["request"] == i) for i in range(3)]
    # a loose ε stops after the first iteration, whose numbers are the same as above
    loose = _edit(model, tok, corpus_path, tmp_path, "pmet", hp=PMET_HP.replace(iterative=True, max_iterations=3,
                                                                            iteration_epsilon=1e9))
    assert len(loose.iterations) == 1 and loose.iterations[0]["stopped"] is True
    assert loose.iterations[0]["p_optimised"] == never.iterations[0]["p_optimised"]
    # and ε between the recorded |Δp| values stops exactly at the first iteration below it
    dps = [r["abs_delta_p"] for r in never.iterations]
    if dps[1] < dps[0]:
        mid = _edit(model, tok, corpus_path, tmp_path, "pmet", hp=PMET_HP.replace(
            iterative=True, max_iterations=3, iteration_epsilon=(dps[0] + dps[1]) / 2))
        assert len(mid.iterations) == 2
    # more iterations changed the weights further than one
    name = next(iter(never.deltas))
    assert not torch.equal(never.deltas[name], loose.deltas[name])


@pytest.mark.parametrize("method", ["pmet", "jeep"])
def test_iterative_edit_replays_bit_exactly(model_factory, corpus_path, tmp_path, method):
    model, tok = model_factory("llama")
    hp = (HP if method == "jeep" else PMET_HP).replace(iterative=True, max_iterations=2, iteration_epsilon=1e-12)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    res = _edit(model, tok, corpus_path, tmp_path, method, hp=hp, apply=True)
    assert len(res.iterations) == 2
    edited = model.state_dict()
    for name in base:
        if name in res.deltas:
            assert torch.equal(edited[name], base[name] + res.deltas[name]), name
        else:
            assert torch.equal(edited[name], base[name]), name
    fresh, _ = model_factory("llama")
    apply_deltas(fresh, res.deltas)
    assert all(torch.equal(fresh.state_dict()[k], edited[k]) for k in edited)


def test_recorded_passes_replay_to_the_same_deltas(model_factory, corpus_path, tmp_path):
    """The ledger's apply stage re-runs the spreads of the recorded passes: same deltas, bit for bit."""
    from pipeline.editing.context import context_prefixes
    from pipeline.corpus import Corpus, Cut
    from pipeline.editing.covariance import second_moments
    from pipeline.editing.spread import written_projections
    from pipeline.stages.targets_file import read_targets, targets_table

    model, tok = model_factory("llama")
    adapter = adapter_for(model)
    spec, hp = get_method("jeep-separate"), HP.replace(iterative=True, max_iterations=2, iteration_epsilon=1e-12)
    reqs = parse_requests(_records())
    targets = written_projections(spec.resolve(hp))
    covs, _ = second_moments(model, tok, adapter, "fp", Corpus.from_file(corpus_path), targets, Cut(32), 8192,
                             "float32", tmp_path, False)
    prefixes = context_prefixes(model, tok, hp)
    first = drive(model, tok, adapter, reqs, prefixes, spec, hp, covs, Optimise(), apply=False)
    assert len(first.values) == 4  # 2 iterations × 2 passes
    path = tmp_path / "kv.parquet"
    import pyarrow.parquet as pq

    pq.write_table(targets_table(first.values, prefixes, hp.layers[-1], {}, {"iterations": first.iterations}), path)
    stored, meta = read_targets(path)
    again = drive(model, tok, adapter, reqs, meta["prefixes"], spec, hp, covs, Replay(stored), apply=False)
    assert again.iterations == [] and len(again.values) == 4
    for name in first.deltas:
        assert torch.equal(first.deltas[name], again.deltas[name]), name


# ------------------------------------------------------------------------------------------ neighbours
def _with_neighbors(model, tok):
    """Records whose neighbourhood samples the tiny model partly answers with the true object:
    target_true is set to the model's own first-token answer on neighbour 0."""
    recs = _records(2)
    for rec in recs:
        rw = rec["requested_rewrite"]
        samples = [{"subject": s, "prompt": rw["prompt"]} for s in ("Montesquieu", "Toko Yasuda", "Rome", "Paris")]
        rec["neighborhood_samples"] = samples
        rec["neighborhood_prompts"] = [x["prompt"].replace("{}", x["subject"]) for x in samples]
        ids = tok(rec["neighborhood_prompts"][0])["input_ids"]
        with torch.no_grad():
            top = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        answer = tok.decode([top])
        if target_ids(tok, answer) != [top] or answer.strip() == rw["target_new"]["str"]:
            pytest.skip("the tiny model's answer does not round-trip through the tokenizer")
        rw["target_true"]["str"] = answer
    return recs


def test_neighbour_filter_keeps_only_neighbours_the_model_answers_correctly(llama):
    model, tok = llama
    recs = _with_neighbors(model, tok)
    reqs = parse_requests(recs)
    chosen = select_neighbors(model, tok, reqs, n=10)
    for r, idx, prompts in zip(reqs, chosen.indices, chosen.prompts):
        pairs = [(p, r.target_true) for p in r.record["neighborhood_prompts"]]
        ok = [j for j, c in enumerate(score_pairs(model, tok, pairs).token_correct.tolist()) if c == 1.0]
        assert 0 in idx and idx == ok  # exactly the ones answered with the true object, in record order
        assert [(t.replace("{}", s), a) for t, s, a in prompts] == [pairs[j] for j in idx]
    capped = select_neighbors(model, tok, reqs, n=1)
    assert capped.indices == [[0], [0]]


def test_neighbour_assisted_loss_and_specificity_exclusion(llama, corpus_path, tmp_path):
    model, tok = llama
    recs = _with_neighbors(model, tok)
    hp = PMET_HP.replace(neighbors=1)
    na = _edit(model, tok, corpus_path, tmp_path, "pmet", hp=hp, records=recs)
    plain = _edit(model, tok, corpus_path, tmp_path, "pmet", hp=PMET_HP, records=recs)
    assert na.editing_neighbors == [[0], [0]] and plain.editing_neighbors is None
    # at step 0 (δ = 0) the rewrite NLL is unchanged and the loss adds the neighbour NLL
    for a, b in zip([r for r in na.traces if r["step"] == 0], [r for r in plain.traces if r["step"] == 0]):
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-6)
        assert a["loss"] == pytest.approx(a["nll"] + a["neighbor_nll"], abs=1e-5)
        assert a["neighbor_nll"] > 0
    assert not torch.equal(next(iter(na.deltas.values())), next(iter(plain.deltas.values())))
    # evaluation leaves the editing neighbours out of specificity, and only them
    reqs = parse_requests(recs)
    _, full = evaluate(model, tok, reqs)
    _, excl = evaluate(model, tok, reqs, na.editing_neighbors)
    nb_full, nb_excl = full[full["kind"] == "neighborhood"], excl[excl["kind"] == "neighborhood"]
    assert len(nb_excl) == len(nb_full) - 2
    for i, r in enumerate(reqs):
        assert r.record["neighborhood_prompts"][0] not in set(nb_excl[nb_excl["request"] == i]["prompt"])
    with pytest.raises(ValueError, match="out of range"):
        evaluate(model, tok, reqs, [[0], [9]])


def test_neighbour_problem_layout_nap_and_engines(llama, corpus_path, tmp_path):
    model, tok = llama
    recs = _with_neighbors(model, tok)
    reqs = parse_requests(recs)
    nbs = [[("The mother tongue of {} is", "Montesquieu", "x")], [("{} is", "Rome", "y")]]
    na = ValueProblem.build(tok, reqs, ["", "I. "], nbs)
    nap = ValueProblem.build(tok, reqs, ["", "I. "], nbs, neighbor_prefixes=True)
    plain = ValueProblem.build(tok, reqs, ["", "I. "])
    assert int(na.neighbor.sum()) == 2 and int(nap.neighbor.sum()) == 4 and int(plain.neighbor.sum()) == 0
    assert na.encoded[: len(plain.encoded)] == plain.encoded  # the plain layout is unchanged
    assert (na.seq_request[na.neighbor] == torch.tensor([0, 1])).all()
    fast = _edit(model, tok, corpus_path, tmp_path, "pmet", hp=PMET_HP.replace(neighbors=2, neighbor_prefixes=True),
                 records=recs, engine="fast")
    ref = _edit(model, tok, corpus_path, tmp_path, "pmet", hp=PMET_HP.replace(neighbors=2, neighbor_prefixes=True),
                records=recs, engine="reference")
    for name in fast.deltas:
        assert float((fast.deltas[name] - ref.deltas[name]).norm()) <= 1e-3 * float(ref.deltas[name].norm())


def test_neighbours_need_counterfact_samples(llama, corpus_path, tmp_path):
    model, tok = llama
    from pipeline.requests import RequestError

    with pytest.raises(RequestError, match="neighborhood_samples"):
        _edit(model, tok, corpus_path, tmp_path, "pmet", hp=PMET_HP.replace(neighbors=1))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_prediction_sites_agree_between_forward_strategies(model_factory, family):
    """δ at the prediction token of a higher layer, with and without the prefix KV cache, and as an
    independent unbatched forward."""
    from pipeline.editing.hooks import add_at, edit_output, hooks
    from pipeline.editing.forward import FullForward, PrefixCachedForward
    from pipeline.editing.methods import POSITION_SITES, SITE_ROLES, site_position

    ALL_SITES = POSITION_SITES["subject"] + POSITION_SITES["prediction"]

    model, tok = model_factory(family)
    adapter = adapter_for(model)
    reqs = parse_requests(_records())
    problem = ValueProblem.build(tok, reqs, ["", "Some words here. "], [[("{} is", "Rome", "Italy")], [], []])
    g = torch.Generator().manual_seed(0)
    d = model.config.get_text_config().hidden_size
    deltas = {s: torch.randn(3, d, generator=g) for s in ALL_SITES}
    active = torch.ones(3, dtype=torch.bool)
    out = {}
    for cls in (FullForward, PrefixCachedForward):
        fwd = cls(model, adapter, problem, {s: 1 if site_position(s) == "subject" else 3 for s in ALL_SITES},
                  tok.pad_token_id)
        with torch.no_grad():
            out[cls] = fwd(deltas, active)
    a, b = out[FullForward], out[PrefixCachedForward]
    torch.testing.assert_close(b.tgt_logits, a.tgt_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.kl_logits, a.kl_logits, atol=1e-4, rtol=1e-4)
    for s in ALL_SITES:
        torch.testing.assert_close(b.site_init[s], a.site_init[s], atol=1e-5, rtol=1e-4)
    # independent: the first target position of each sequence, one sequence at a time
    for s_idx, e in enumerate(problem.encoded):
        if int(problem.pred_pos[s_idx]) < 0:
            continue
        r = int(problem.seq_request[s_idx])
        regs = []
        for site in ALL_SITES:
            pos = e.subject_last if site_position(site) == "subject" else int(problem.pred_pos[s_idx])
            layer = 1 if site_position(site) == "subject" else 3
            regs.append(edit_output(adapter.module(model, SITE_ROLES[site], layer),
                                    add_at(torch.tensor([0]), torch.tensor([pos]), deltas[site][r : r + 1])))
        with torch.no_grad(), hooks(regs):
            logits = model(input_ids=torch.tensor([e.ids])).logits[0]
        t = int((problem.tgt_seq == s_idx).nonzero()[0])
        torch.testing.assert_close(a.tgt_logits[t], logits[int(problem.tgt_pos[t])], atol=1e-4, rtol=1e-4)


def test_cli_rejects_bad_methods_and_modifiers_before_model_work(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    import pipeline.models.loading as loading
    from pipeline.cli import app

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    req = tmp_path / "req.json"
    req.write_text(json.dumps(_records(2)))
    cases = [(["--method", "jeep-turbo"], "unknown method 'jeep-turbo'"),
             (["--neighbors", "11"], "neighbors must be an integer in 0..10"),
             (["--neighbors", "1"], "needs a CounterFact record with target_true and neighborhood_samples")]
    for extra, msg in cases:
        res = CliRunner().invoke(app, ["edit", "--requests", str(req), "--out", str(tmp_path / "o"), *extra])
        assert res.exit_code == 2 and msg in res.output, (extra, res.output)
        assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(app, ["probe", "similarity", "--n", "0", "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "n ≥ 1" in res.output and not (tmp_path / "p").exists()
