"""Target-value optimisation: the two forward strategies, batching, stopping, clamping, failures."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import COUNTERFACT_RECORDS, HIDDEN, make_model, tok_for
import pipeline.editing.forward as forward_mod
from pipeline.editing.hooks import add_at, edit_output, hooks
from pipeline.editing.hparams import HParams
from pipeline.editing.keys import site_values
from pipeline.editing.methods import POSITION_SITES, SITE_ROLES, Region, sites_of
from pipeline.requests import parse_requests
from pipeline.editing.forward import FullForward, PrefixCachedForward, StepOutput
from pipeline.editing.optimise import OptimisationError, optimise_values
from pipeline.editing.problem import ValueProblem
from pipeline.evaluation.scoring import score_pairs
from pipeline.models.adapters import adapter_for
from pipeline.models.attention import GROUPED, attention_implementation

PREFIXES = ["", "Some words here. "]
LAYER = 2
PMET_SITES = ("attn", "mlp")
SITES = POSITION_SITES["subject"]  # residual, attn and mlp


def _requests(n=3):
    return parse_requests(copy.deepcopy(COUNTERFACT_RECORDS[:n]))


def _dims(model, adapter, sites):
    return {s: (model.config.hidden_size if s == "residual" else adapter.in_out_dims(model, SITE_ROLES[s], LAYER)[1])
            for s in sites}


def _hp(**kw):
    base = dict(layers=(1, LAYER), v_num_grad_steps=5, v_lr=0.5, kl_factor=0.0625, loss_stop=1e-9)
    return HParams(**{**base, **kw})


def _forward(cls, model, tok, requests, sites, prefixes=PREFIXES):
    adapter = adapter_for(model)
    problem = ValueProblem.build(tok, requests, prefixes)
    return cls(model, adapter, problem, {s: LAYER for s in sites}, tok.pad_token_id)


def _optimise(forward, names, dims, hp, *args, **kwargs):
    """optimise_values with the sites ``names`` of one subject region over ``hp.layers``."""
    region = Region("low", "subject", tuple(names), (), "sqrt", hp.layers, hp.mom2_update_weight, hp.clamp_norm_factor,
                    hp.v_weight_decay)
    return optimise_values(forward, sites_of((region,)), dims, hp, *args, **kwargs)


def _random_deltas(n, sites, scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(n, HIDDEN, generator=g) * scale for s in sites}


def _independent(model, tok, problem, deltas, sites):
    """Target/KL logits recomputed one unpadded sequence at a time through model(...)."""
    adapter = adapter_for(model)
    tgt, kl = [], []
    for s, e in enumerate(problem.encoded):
        r = int(problem.seq_request[s])
        regs = [edit_output(adapter.module(model, SITE_ROLES[site], LAYER),
                            add_at(torch.tensor([0]), torch.tensor([e.subject_last]), deltas[site][r : r + 1]))
                for site in sites]
        with torch.no_grad(), hooks(regs):
            logits = model(input_ids=torch.tensor([e.ids])).logits[0]
        for t in (problem.tgt_seq == s).nonzero().squeeze(1).tolist():
            tgt.append((t, logits[int(problem.tgt_pos[t])]))
        if s in problem.kl_seq.tolist():
            kl.append((problem.kl_seq.tolist().index(s), logits[e.subject_last]))
    return torch.stack([x for _, x in sorted(tgt, key=lambda p: p[0])]), torch.stack([x for _, x in sorted(kl, key=lambda p: p[0])])


# ------------------------------------------------------------------------------------ problem
def test_value_problem_layout(tok):
    reqs = _requests(3)
    p = ValueProblem.build(tok, reqs, PREFIXES)
    assert len(p.encoded) == 3 * len(PREFIXES) + 3
    assert p.seq_request.tolist() == [0, 0, 1, 1, 2, 2, 0, 1, 2]
    assert p.first_rewrite.tolist() == [0, 2, 4] and p.kl_seq.tolist() == [6, 7, 8]
    assert p.tgt_count.tolist()[-3:] == [0, 0, 0]
    assert max(p.tgt_count.tolist()) == 2  # one multi-token target: teacher forcing is exercised
    for s in range(6):
        e = p.encoded[s]
        r = reqs[int(p.seq_request[s])]
        tgt = tok(" " + r.target_new, add_special_tokens=False)["input_ids"]
        assert p.tgt_count[s] == len(tgt)
        prompt_ids = tok(PREFIXES[s % 2] + r.text)["input_ids"]
        assert e.ids == prompt_ids + tgt[:-1]  # teacher forcing: o*[:-1] appended
        assert p.tgt_tok[p.tgt_seq == s].tolist() == tgt
        # the last prompt token predicts the first target token, and so on
        assert p.tgt_pos[p.tgt_seq == s].tolist() == list(range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(tgt)))
        # the subject's last token ends the subject: the text up to it is everything up to the subject
        upto = PREFIXES[s % 2] + r.prompt.split("{}")[0] + r.subject
        assert tok.decode(e.ids[: e.subject_last + 1], skip_special_tokens=True) == upto
    # the KL prompt "{s} is a" ends at the subject's last token, where the KL is read
    kl = p.encoded[6]
    assert tok.decode(kl.ids, skip_special_tokens=True) == reqs[0].subject
    assert kl.subject_last == len(kl.ids) - 1 and p.kl_seq[0] == 6


# ------------------------------------------------------------------------------------ (a) strategies agree
@pytest.fixture(params=[0, 10**9], ids=["bucket-per-length", "one-bucket"])
def buckets(request, monkeypatch):
    """Run the prefix-cached strategy with suffix-length buckets as fine or as coarse as possible."""
    monkeypatch.setattr(forward_mod, "BUCKET_OVERHEAD_TOKENS", request.param)
    return request.param


@pytest.mark.parametrize("attention", ["model", "eager", "grouped"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox", "gemma3_text"])
def test_prefix_cached_equals_full_forward(model_factory, family, buckets, attention):
    """The fast strategy (optionally with eager attention over its left-padded prefix cache and
    right-padded suffixes) gives the reference strategy's logits with the model's own kernel."""
    model, tok = model_factory(family)
    reqs = _requests(3)
    sites = SITES  # residual, attn and mlp all at once
    full = _forward(FullForward, model, tok, reqs, sites)
    deltas = _random_deltas(3, sites)
    active = torch.ones(3, dtype=torch.bool)
    own = model.config._attn_implementation
    with torch.no_grad():
        with attention_implementation(model, attention):
            if attention != "model" and model._can_set_attn_implementation():
                assert model.config._attn_implementation == {"grouped": GROUPED}.get(attention, attention) != own
            fast = _forward(PrefixCachedForward, model, tok, reqs, sites)
            b = fast(deltas, active)
        assert model.config._attn_implementation == own
        a = full(deltas, active)
        zero = full({s: d * 0 for s, d in deltas.items()}, active)
    assert a.tgt_logits.shape == (len(full.p.tgt_tok), model.config.vocab_size)
    assert a.kl_logits.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(b.tgt_logits, a.tgt_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.kl_logits, a.kl_logits, atol=1e-4, rtol=1e-4)
    for s in sites:
        torch.testing.assert_close(b.site_init[s], a.site_init[s], atol=1e-5, rtol=1e-4)
    assert (a.tgt_logits - zero.tgt_logits).abs().max() > 1e-2  # δ matters
    assert (a.kl_logits - zero.kl_logits).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_steps_start_at_the_layer_where_delta_enters(model_factory, family):
    """The blocks below the δ layer run once, when the strategy is built (their output does not
    depend on δ), and never in a step; GPT-J's blocks return tuples, Llama's tensors."""
    model, tok = model_factory(family)
    adapter = adapter_for(model)
    calls = dict.fromkeys(range(LAYER + 1), 0)  # MLP runs per block: a bypassed block runs none
    regs = [(lambda i=i: adapter.module(model, "mlp_out", i).register_forward_pre_hook(
        lambda *_: calls.__setitem__(i, calls[i] + 1))) for i in calls]
    with hooks(regs):
        fast = _forward(PrefixCachedForward, model, tok, _requests(3), PMET_SITES)
        built = dict(calls)
        with torch.no_grad():
            fast(_random_deltas(3, PMET_SITES), torch.ones(3, dtype=torch.bool))
    assert fast.start == LAYER
    assert [built[i] for i in range(LAYER)] == [2] * LAYER and built[LAYER] == 1  # prefixes, then suffixes below
    assert all(calls[i] == built[i] for i in range(LAYER))  # the step did not run them
    assert calls[LAYER] > built[LAYER]  # it starts here
    assert not any("forward" in vars(adapter.module(model, "block", i)) for i in range(LAYER))  # bypass undone


@pytest.mark.parametrize("site", SITES)
def test_each_site_alone_agrees_with_independent_forwards(llama, site):
    model, tok = llama
    reqs = _requests(3)
    full = _forward(FullForward, model, tok, reqs, (site,))
    fast = _forward(PrefixCachedForward, model, tok, reqs, (site,))
    deltas = _random_deltas(3, (site,))
    active = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        a, b = full(deltas, active), fast(deltas, active)
    tgt, kl = _independent(model, tok, full.p, deltas, (site,))
    torch.testing.assert_close(a.tgt_logits, tgt, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.kl_logits, kl, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.tgt_logits, tgt, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.kl_logits, kl, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_strategies_agree_on_a_subset_of_active_requests(model_factory, family, buckets):
    model, tok = model_factory(family)
    reqs = _requests(3)
    full = _forward(FullForward, model, tok, reqs, PMET_SITES)
    fast = _forward(PrefixCachedForward, model, tok, reqs, PMET_SITES)
    active = torch.tensor([True, False, True])
    deltas = _random_deltas(2, PMET_SITES)  # rows of the active requests only
    with torch.no_grad():
        a, b = full(deltas, active), fast(deltas, active)
        b_all = fast({s: torch.stack([d[0], torch.zeros(HIDDEN), d[1]]) for s, d in deltas.items()},
                     torch.ones(3, dtype=torch.bool))
    n_tgt = int(active[full.p.seq_request[full.p.tgt_seq]].sum())
    assert a.tgt_logits.shape[0] == n_tgt and a.kl_logits.shape[0] == 2
    torch.testing.assert_close(b.tgt_logits, a.tgt_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.kl_logits, a.kl_logits, atol=1e-4, rtol=1e-4)
    # the active requests' rows equal those of a forward over all requests
    keep = active[full.p.seq_request[full.p.tgt_seq]]
    torch.testing.assert_close(b_all.tgt_logits[keep], b.tgt_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b_all.kl_logits[active], b.kl_logits, atol=1e-4, rtol=1e-4)


def test_subject_at_position_zero(gpt2):
    """No BOS and the subject first: its last token can be position 0 (empty cached prefix)."""
    model, tok = gpt2
    reqs = parse_requests([{"subject": "Rome", "prompt": "{} is the capital of", "target_new": "France"},
                           {"subject": "Madrid", "prompt": "{} is located in", "target_new": "Sweden"}])
    for prefixes in ([""], PREFIXES):
        full = _forward(FullForward, model, tok, reqs, PMET_SITES, prefixes)
        fast = _forward(PrefixCachedForward, model, tok, reqs, PMET_SITES, prefixes)
        assert min(e.subject_last for e in full.p.encoded) == 0
        deltas = _random_deltas(2, PMET_SITES)
        active = torch.ones(2, dtype=torch.bool)
        with torch.no_grad():
            a, b = full(deltas, active), fast(deltas, active)
        torch.testing.assert_close(b.tgt_logits, a.tgt_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.kl_logits, a.kl_logits, atol=1e-4, rtol=1e-4)


def test_prefix_cached_with_short_sliding_window():
    """BUG (pipeline/editing/values.py, PrefixCachedForward): with sliding-window attention layers
    (Gemma-3, Mistral) whose window is shorter than the padded prefix width, the fast strategy
    computes different logits from the reference.  ``_run_prefixes`` keeps ``layer.keys`` of a
    ``DynamicCache(config=...)``: sliding layers hold only the last ``sliding_window - 1`` columns,
    and the rebuilt cache then disagrees with the W-column prefix attention mask."""
    model = make_model("gemma3_text", sliding_window=4)
    tok = tok_for("gemma3_text")
    reqs = _requests(3)
    full = _forward(FullForward, model, tok, reqs, ("mlp",))
    fast = _forward(PrefixCachedForward, model, tok, reqs, ("mlp",))
    deltas = _random_deltas(3, ("mlp",))
    active = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        a, b = full(deltas, active), fast(deltas, active)
    tgt, _ = _independent(model, tok, full.p, deltas, ("mlp",))
    torch.testing.assert_close(a.tgt_logits, tgt, atol=1e-4, rtol=1e-4)  # the reference is right
    err = float((b.tgt_logits - a.tgt_logits).abs().max())
    assert err < 1e-4, (f"PrefixCachedForward disagrees with FullForward by {err:.3g} on a sliding-window "
                        "model (sliding_window=4 < prefix width): KV cache of sliding layers truncated")


# ------------------------------------------------------------------------------------ site values
@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_init_values_equal_site_values(model_factory, family):
    model, tok = model_factory(family)
    reqs = _requests(3)
    fast = _forward(PrefixCachedForward, model, tok, reqs, SITES)
    with torch.no_grad():  # as in optimise_values: init is read at step 0, where every δ is 0
        out = fast(_random_deltas(3, SITES, scale=0.0), torch.ones(3, dtype=torch.bool))
    adapter = adapter_for(model)
    for s in SITES:
        torch.testing.assert_close(out.site_init[s], site_values(model, tok, adapter, reqs, s, LAYER), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------ (b) batched = alone
@pytest.mark.parametrize("family,sites", [("llama", PMET_SITES), ("llama", ("residual",)), ("gptj", PMET_SITES),
                                          ("gpt2", ("mlp",))])
def test_batched_optimisation_equals_one_request_at_a_time(model_factory, family, sites):
    model, tok = model_factory(family)
    adapter = adapter_for(model)
    reqs = _requests(3)
    hp = _hp()
    dims = _dims(model, adapter, sites)
    batched = _optimise(_forward(PrefixCachedForward, model, tok, reqs, sites), sites, dims, hp)
    assert batched.steps.tolist() == [hp.v_num_grad_steps] * 3
    for i, r in enumerate(reqs):
        alone = _optimise(_forward(FullForward, model, tok, [r], sites), sites, dims, hp)
        for s in sites:
            assert batched.deltas[s].shape == (3, dims[s])
            torch.testing.assert_close(batched.deltas[s][i], alone.deltas[s][0], atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(batched.init[s][i], alone.init[s][0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batched.targets[s][i], alone.init[s][0] + alone.deltas[s][0], atol=1e-3, rtol=1e-3)
        mine = [row["loss"] for row in batched.trace if row["request"] == i]
        theirs = [row["loss"] for row in alone.trace]
        assert mine == pytest.approx(theirs, rel=1e-3, abs=1e-4)
    for s in sites:
        assert float(batched.deltas[s].norm()) > 0


def test_chunked_steps_equal_one_big_batch(llama):
    """Chunks of requests with accumulated gradients are the same optimisation as one batch
    (requests never interact), including per-request stopping and the trace."""
    model, tok = llama
    adapter = adapter_for(model)
    reqs = _requests(4)
    dims = _dims(model, adapter, PMET_SITES)
    whole = _optimise(_forward(PrefixCachedForward, model, tok, reqs, PMET_SITES), PMET_SITES, dims,
                            _hp(v_batch_requests=4, nll_weight_after_argmax=0.1))
    chunked = _optimise(_forward(PrefixCachedForward, model, tok, reqs, PMET_SITES), PMET_SITES, dims,
                              _hp(v_batch_requests=3, nll_weight_after_argmax=0.1))
    assert chunked.steps.tolist() == whole.steps.tolist()
    for s in PMET_SITES:
        torch.testing.assert_close(chunked.deltas[s], whole.deltas[s], atol=1e-4, rtol=1e-4)
    key = lambda r: (r["step"], r["request"])  # noqa: E731
    assert [key(r) for r in sorted(chunked.trace, key=key)] == [key(r) for r in sorted(whole.trace, key=key)]


def test_first_step_loss_is_the_unedited_nll(llama):
    """Step 0: δ = 0, so KL = 0, weight decay = 0 and the NLL is the model's own teacher-forced
    NLL of o*, averaged over the rewriting prompts (cross-checked with the scorer)."""
    model, tok = llama
    adapter = adapter_for(model)
    reqs = _requests(3)
    res = _optimise(_forward(PrefixCachedForward, model, tok, reqs, PMET_SITES), PMET_SITES,
                          _dims(model, adapter, PMET_SITES), _hp(v_num_grad_steps=2))
    for i, r in enumerate(reqs):
        row = next(x for x in res.trace if x["request"] == i and x["step"] == 0)
        sc = score_pairs(model, tok, [(p + r.text, r.target_new) for p in PREFIXES])
        assert row["nll"] == pytest.approx(float(-sc.mean_logprob.mean()), rel=1e-4)
        assert abs(row["kl"]) < 1e-5 and row["weight_decay"] == 0.0
        assert row["loss"] == pytest.approx(row["nll"], rel=1e-6)
        later = next(x for x in res.trace if x["request"] == i and x["step"] == 1)
        assert later["nll"] < row["nll"]  # one Adam step on δ lowers the NLL


# ------------------------------------------------------------------------------------ (c) early stopping
def _first_below(losses, t):
    return next((s for s, v in enumerate(losses) if v < t), None)


def test_per_request_early_stopping(llama):
    model, tok = llama
    adapter = adapter_for(model)
    reqs = _requests(3)
    sites = PMET_SITES
    dims = _dims(model, adapter, sites)
    n_steps = 10
    # no weight decay and a loose clamp: every request's loss decreases step by step
    hp = _hp(v_num_grad_steps=n_steps, v_lr=0.1, v_weight_decay=0.0, clamp_norm_factor=4.0)
    base = _optimise(_forward(PrefixCachedForward, model, tok, reqs, sites), sites, dims, hp)
    losses = {i: [row["loss"] for row in base.trace if row["request"] == i] for i in range(3)}
    # a threshold that one request crosses mid-way while another never does
    choice = None
    for t in sorted(v for ls in losses.values() for v in ls):
        t = t * (1 + 1e-4)
        first = {i: _first_below(ls, t) for i, ls in losses.items()}
        early = [i for i, f in first.items() if f is not None and 1 <= f <= n_steps - 3]
        never = [i for i, f in first.items() if f is None]
        if early and never:
            choice = (t, early[0], never[0], first[early[0]])
            break
    assert choice is not None, losses
    t, a, b, stop = choice
    res = _optimise(_forward(PrefixCachedForward, model, tok, reqs, sites), sites, dims, hp.replace(loss_stop=t))
    assert res.steps[a] == stop + 1 < n_steps
    assert res.steps[b] == n_steps
    assert max(row["step"] for row in res.trace if row["request"] == a) == stop
    assert max(row["step"] for row in res.trace if row["request"] == b) == n_steps - 1
    # the stopped request keeps the δ it had when it stopped: = a run of exactly stop+1 forwards
    short = _optimise(_forward(PrefixCachedForward, model, tok, reqs, sites), sites, dims,
                            hp.replace(v_num_grad_steps=stop + 1))
    for s in sites:
        torch.testing.assert_close(res.deltas[s][a], short.deltas[s][a], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(res.deltas[s][a], base.deltas[s][a], atol=1e-4)
        # the others were not disturbed by the freeze
        torch.testing.assert_close(res.deltas[s][b], base.deltas[s][b], atol=1e-6, rtol=1e-5)
    # and the reference engine (one request alone, full forwards) stops at the same step
    alone = _optimise(_forward(FullForward, model, tok, [reqs[a]], sites), sites, dims, hp.replace(loss_stop=t))
    assert alone.steps.tolist() == [stop + 1]


def _forced_argmax(fwd, request, from_call=0):
    """A forward whose target logits make o* the argmax for ``request`` from call ``from_call`` on."""
    p = fwd.p
    calls = {"n": 0}

    def forced(deltas, active):
        out = fwd(deltas, active)
        calls["n"] += 1
        if calls["n"] <= from_call:
            return out
        tgt = out.tgt_logits.clone()
        keep = active[p.seq_request[p.tgt_seq]]
        rows = (p.seq_request[p.tgt_seq][keep] == request).nonzero().squeeze(1)
        tgt[rows, p.tgt_tok[keep][rows]] += 12.0  # argmax, yet NLL ≈ 1e-3 stays above loss_stop
        return StepOutput(tgt, out.kl_logits, out.site_init)

    forced.p, forced.device, forced.model = p, fwd.device, fwd.model
    return forced


def test_pmet_rule_stops_at_argmax_when_kl_is_small(llama):
    """PMET's rule: once o* is the argmax on every rewriting prompt and KL ≤ kl_stop, stop."""
    model, tok = llama
    adapter = adapter_for(model)
    fwd = _forward(PrefixCachedForward, model, tok, _requests(2), PMET_SITES)
    hp = _hp(v_num_grad_steps=4, nll_weight_after_argmax=0.1, kl_stop=1e6)
    res = _optimise(_forced_argmax(fwd, 1), PMET_SITES, _dims(model, adapter, PMET_SITES), hp)
    assert res.steps.tolist() == [4, 1]
    assert [x["argmax"] for x in res.trace if x["request"] == 1] == [True]
    assert [x["argmax"] for x in res.trace if x["request"] == 0] == [False] * 4
    assert all(x["nll_weight"] == 1.0 for x in res.trace if x["request"] == 0)
    assert float(res.deltas["mlp"][1].norm()) == 0.0  # stopped before any step
    # without the PMET rule (MEMIT's only) the same forward does not stop
    res = _optimise(_forced_argmax(fwd, 1), PMET_SITES, _dims(model, adapter, PMET_SITES), _hp(v_num_grad_steps=4))
    assert res.steps.tolist() == [4, 4]


def test_pmet_rule_lowers_nll_weight_after_argmax(llama):
    """Argmax reached but KL above kl_stop: the request continues with NLL weight ψ."""
    model, tok = llama
    adapter = adapter_for(model)
    fwd = _forward(PrefixCachedForward, model, tok, _requests(2), PMET_SITES)
    hp = _hp(v_num_grad_steps=4, nll_weight_after_argmax=0.1, kl_stop=1e-12)
    res = _optimise(_forced_argmax(fwd, 1, from_call=1), PMET_SITES, _dims(model, adapter, PMET_SITES), hp)
    rows = [x for x in res.trace if x["request"] == 1]
    assert [x["argmax"] for x in rows] == [False, True, True, True]
    assert [x["nll_weight"] for x in rows] == pytest.approx([1.0, 1.0, 0.1, 0.1])
    for x in rows:
        assert x["loss"] == pytest.approx(x["nll_weight"] * x["nll"] + hp.kl_factor * x["kl"]
                                          + hp.v_weight_decay * x["weight_decay"], rel=1e-5, abs=1e-6)
    assert res.steps.tolist() == [4, 4]
    assert all(x["nll_weight"] == 1.0 for x in res.trace if x["request"] == 0)


def test_encore_early_stop_waits_for_k_steps_of_argmax_in_a_row(llama):
    """ENCORE's MPES (argmax_stop_steps = k): a request stops once o* has been the argmax on every
    rewriting prompt for k consecutive steps, and not before."""
    model, tok = llama
    adapter = adapter_for(model)
    fwd = _forward(PrefixCachedForward, model, tok, _requests(2), PMET_SITES)
    dims = _dims(model, adapter, PMET_SITES)
    res = _optimise(_forced_argmax(fwd, 1, from_call=1), PMET_SITES, dims, _hp(v_num_grad_steps=6, argmax_stop_steps=3))
    assert [x["argmax"] for x in res.trace if x["request"] == 1] == [False, True, True, True]
    assert res.steps.tolist() == [6, 4]  # argmax at steps 1, 2, 3: stopped after the third
    off = _optimise(_forced_argmax(fwd, 1, from_call=1), PMET_SITES, dims, _hp(v_num_grad_steps=6))
    assert off.steps.tolist() == [6, 6]


# ------------------------------------------------------------------------------------ (d) clamp
@pytest.mark.parametrize("sites", [PMET_SITES, ("residual",)])
def test_clamp_bounds_each_site_by_its_own_norm(llama, sites):
    model, tok = llama
    adapter = adapter_for(model)
    reqs = _requests(3)
    factor = 0.01
    res = _optimise(_forward(PrefixCachedForward, model, tok, reqs, sites), sites, _dims(model, adapter, sites),
                          _hp(clamp_norm_factor=factor, v_lr=1.0))
    for s in sites:
        bound = factor * res.init[s].norm(dim=-1)
        norms = res.deltas[s].norm(dim=-1)
        assert (norms <= bound * (1 + 1e-5)).all(), (norms, bound)
        assert (norms >= 0.5 * bound).all()  # the clamp was active, not vacuous
    for row in res.trace:
        for s in sites:
            r = row["request"]
            assert row[f"norm_{s}"] <= factor * float(res.init[s][r].norm()) * (1 + 1e-5)


# ------------------------------------------------------------------------------------ (e) non-finite
def test_zero_site_norm_gives_optimisation_error(llama):
    """A site whose initial value is 0 makes the relative weight decay 0/0."""
    model, tok = llama
    adapter = adapter_for(model)
    with torch.no_grad():
        adapter.weight(model, "mlp_out", LAYER).zero_()
    reqs = _requests(2)
    with pytest.raises(OptimisationError, match="non-finite loss at step 0 for request"):
        _optimise(_forward(PrefixCachedForward, model, tok, reqs, ("mlp",)), ("mlp",),
                        _dims(model, adapter, ("mlp",)), _hp())


def test_nan_logits_give_optimisation_error(llama):
    model, tok = llama
    adapter = adapter_for(model)
    reqs = _requests(3)
    fwd = _forward(PrefixCachedForward, model, tok, reqs, PMET_SITES)
    calls = {"n": 0}

    def poisoned(deltas, active):
        out = fwd(deltas, active)
        calls["n"] += 1
        if calls["n"] == 3:
            p = fwd.p
            keep = active[p.seq_request[p.tgt_seq]]
            bad = (p.seq_request[p.tgt_seq][keep] == 1).nonzero().squeeze(1)
            tgt = out.tgt_logits.clone()
            tgt[bad] = float("nan")
            return StepOutput(tgt, out.kl_logits, out.site_init)
        return out

    poisoned.p, poisoned.device, poisoned.model = fwd.p, fwd.device, model
    with pytest.raises(OptimisationError, match=r"step 2 for request\(s\) \[1\]"):
        _optimise(poisoned, PMET_SITES, _dims(model, adapter, PMET_SITES), _hp())


@pytest.mark.parametrize("lengths,overhead,expected", [
    ([], 64, []),
    ([3], 0, [(0, 1)]),
    ([2, 2, 3, 3, 8], 0, [(0, 2), (2, 4), (4, 5)]),
    ([2, 2, 3, 3, 8], 2, [(0, 4), (4, 5)]),  # padding 2 rows by 1 costs 2: merged
    ([2, 2, 3, 3, 8], 19, [(0, 4), (4, 5)]),  # padding 4 rows by 5 costs 20 > 19
    ([2, 2, 3, 3, 8], 20, [(0, 5)]),
])
def test_length_buckets(lengths, overhead, expected):
    got = forward_mod.length_buckets(lengths, overhead)
    assert [(b.start, b.stop) for b in got] == expected
