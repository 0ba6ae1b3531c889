"""Constrained updates for lifelong editing (issue 18): the null-space rule, its history, the norm
controls, and the history as the ledger keeps it."""

from __future__ import annotations

import copy

import pytest
import torch

import pipeline
from conftest import COUNTERFACT_RECORDS
from pipeline.editing.driver import anchor_targets
from pipeline.editing.history import history_of
from pipeline.editing.hparams import HParams, HParamsError
from pipeline.editing.optimise import ValueResult
from pipeline.editing.solvers import closed_form_update, null_space_projector, null_space_update
from pipeline.models.adapters import adapter_for

HP = HParams(layers=(1, 2), v_num_grad_steps=5, v_lr=0.5, mom2_update_weight=100.0, loss_stop=1e-6, clamp_norm_factor=3.0,
             context_starters=("The",), context_length=3, cov_max_length=32)
D_IN, D_OUT = 24, 16


def _system(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g, dtype=torch.float64))[0]
    spectrum = torch.logspace(-6, 2, D_IN, dtype=torch.float64)  # ascending: a few large directions
    cov = basis @ torch.diag(spectrum) @ basis.T
    keys = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    resid = torch.randn(n, D_OUT, generator=g, dtype=torch.float64)
    return cov, torch.linalg.eigh(cov), keys, resid


# ------------------------------------------------------------------------------------ the math
@pytest.mark.parametrize("share", [0.25, 0.5, 0.9])
def test_the_projected_update_leaves_the_preserved_subspace_unchanged(share):
    cov, spectrum, keys, resid = _system()
    p = null_space_projector(spectrum, share)
    assert torch.allclose(p @ p, p, atol=1e-10) and round(float(torch.trace(p))) == round(share * D_IN)
    upd = null_space_update(keys, resid, p, None, alpha=1e-2)
    preserved = spectrum[1][:, round(share * D_IN):]  # the eigenvectors P leaves out: range(I − P)
    assert float((upd @ preserved).abs().max()) < 1e-10 * float(upd.abs().max())
    assert torch.allclose(upd, upd @ p, atol=1e-10)
    # and it still writes: the edit's keys move towards their residuals
    assert float((keys @ upd.T - resid).norm()) < float(resid.norm())


def test_the_history_term_keeps_earlier_edits_keys_in_place():
    cov, spectrum, _, _ = _system()
    p = null_space_projector(spectrum, 0.75)
    _, _, earlier, _ = _system(seed=1, n=6)
    _, _, keys, resid = _system(seed=2, n=5)
    free = null_space_update(keys, resid, p, None, alpha=1e-2)
    kept = null_space_update(keys, resid, p, history_of([{"k": earlier.float()}])["k"], alpha=1e-2)
    moved = lambda upd: float((earlier @ upd.T).norm())  # noqa: E731 - how far the earlier keys' outputs move
    assert moved(kept) < 0.2 * moved(free), (moved(kept), moved(free))


def test_encore_norm_term_shrinks_the_update_and_zero_changes_nothing():
    cov, _, keys, resid = _system()
    plain = closed_form_update(keys, resid, cov, 1.0)
    assert torch.equal(closed_form_update(keys, resid, cov, 1.0, 0.0), plain)
    assert float(closed_form_update(keys, resid, cov, 1.0, 10.0).norm()) < float(plain.norm())


def test_norm_anchoring_rescales_targets_and_skips_far_ones():
    z = torch.tensor([[3.0, 4.0], [30.0, 40.0]])  # norms 5 and 50
    init = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v = ValueResult({"mlp": z}, {"mlp": init}, {"mlp": z - init}, torch.tensor([1, 1]))
    anchors = {"mlp": torch.tensor([2.0, 4.0])}
    out = anchor_targets(v, anchors, None)
    torch.testing.assert_close(out.targets["mlp"].norm(dim=-1), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(out.targets["mlp"][0], z[0] * 0.4)  # direction kept
    skipped = anchor_targets(v, anchors, skip=10.0)  # 50 > 10 × 4: request 1 keeps its current value
    assert torch.equal(skipped.targets["mlp"][1], init[1]) and torch.equal(skipped.targets["mlp"][0], out.targets["mlp"][0])


@pytest.mark.parametrize("change,match", [(dict(solver="null_space", null_space_share=0.0), "null_space_share"),
                                          (dict(null_space_alpha=0.0), "null_space_alpha"),
                                          (dict(norm_weight=-1.0), "norm_weight"),
                                          (dict(argmax_stop_steps=-1), "argmax_stop_steps"),
                                          (dict(norm_anchor_skip=2.0), "needs norm_anchor"),
                                          (dict(norm_anchor=True, norm_anchor_skip=0.5), "norm_anchor_skip")])
def test_bad_constraint_settings_are_rejected(change, match):
    with pytest.raises(HParamsError, match=match):
        HP.replace(**change)


# ------------------------------------------------------------------------------------ through edit()
def _edit(model, tok, corpus, cache, records, hp, method="pmet", **kw):
    return pipeline.edit(model, tok, copy.deepcopy(records), method=method, hparams=hp, corpus=corpus, cache_dir=cache,
                         progress=False, **kw)


@pytest.mark.parametrize("method,modifier", [("memit", {}), ("pmet", {}), ("pmet-attn-write", {}), ("jeep", {}),
                                             ("jeep-separate", {}), ("pmet", {"iterative": True, "max_iterations": 2})])
def test_every_method_composes_with_the_null_space_rule(llama, corpus_path, tmp_path, method, modifier):
    """The written layers' deltas annihilate the preserved directions of their own covariance (also
    summed over the passes of separate optimisation and the iterations of iterative editing)."""
    from pipeline.corpus import Corpus
    from pipeline.editing.covariance import cut_of, second_moments, spectra
    from pipeline.editing.methods import get_method
    from pipeline.editing.spread import written_projections
    from pipeline.models.loading import model_fingerprint

    model, tok = llama
    hp = HP.replace(solver="null_space", null_space_share=0.5, null_space_alpha=1e-3, **modifier)
    if method.startswith("jeep"):
        hp = hp.replace(layers=(0, 1), high_layers=(2, 3), high_clamp_norm_factor=0.5)
    res = _edit(model, tok, corpus_path, tmp_path, COUNTERFACT_RECORDS[:3], hp, method)
    adapter = adapter_for(model)
    targets = written_projections(get_method(method).resolve(hp))
    covs, ids = second_moments(model, tok, adapter, model_fingerprint(model), Corpus.from_file(corpus_path), targets,
                               cut_of(hp), hp.cov_batch_tokens, hp.cov_dtype, tmp_path, False)
    for (role, layer), (values, vectors) in spectra(covs, ids, tmp_path).items():
        d = res.deltas[adapter.parameter_name(role, layer)]
        w_delta = d.T if adapter.transposed else d  # [out, in]
        preserved = vectors[:, round(0.5 * vectors.shape[1]):].float()
        assert float((w_delta @ preserved).abs().max()) < 1e-4 * float(w_delta.abs().max()) + 1e-9, (role, layer)
        assert float(w_delta.norm()) > 0
    for r in res.layers:  # rank(P) is recorded per written layer
        assert r["projector_rank"] == round(0.5 * adapter.in_out_dims(model, r["role"], r["layer"])[0])
    assert set(res.keys) == {f"{role}@{layer}" for role, layer in targets}


def test_history_makes_a_second_batch_move_the_first_batchs_keys_less(llama, corpus_path, tmp_path):
    model, tok = llama
    hp = HP.replace(solver="null_space", null_space_share=0.9, null_space_alpha=1e-4)
    first = _edit(model, tok, corpus_path, tmp_path, COUNTERFACT_RECORDS[:2], hp, apply=True)
    name = adapter_for(model).parameter_name("mlp_out", 1)
    k1 = first.keys["mlp_out@1"].double()
    moved = {}
    for label, history in (("free", None), ("kept", history_of([first.keys]))):
        second = _edit(model, tok, corpus_path, tmp_path, COUNTERFACT_RECORDS[2:4], hp, history=history)
        moved[label] = float((k1 @ second.deltas[name].double().T).norm())
    assert moved["kept"] < 0.5 * moved["free"], moved


def test_encore_and_nas_settings_run_through_edit(llama, corpus_path, tmp_path):
    model, tok = llama
    base = _edit(model, tok, corpus_path, tmp_path, COUNTERFACT_RECORDS[:3], HP)
    nc = _edit(model, tok, corpus_path, tmp_path, COUNTERFACT_RECORDS[:3], HP.replace(norm_weight=10.0))
    name = adapter_for(model).parameter_name("mlp_out", 1)
    assert float(nc.deltas[name].norm()) < float(base.deltas[name].norm())
    nas = _edit(model, tok, corpus_path, tmp_path, COUNTERFACT_RECORDS[:3], HP.replace(norm_anchor=True))
    (values,) = nas.values
    for site, z in values.targets.items():  # every target at its unedited-model norm (model = unedited here)
        torch.testing.assert_close(z.norm(dim=-1), values.init[site].norm(dim=-1), rtol=1e-5, atol=1e-6)


def test_a_history_rebuilt_from_its_recorded_targets_is_bit_identical(llama, corpus_path, tmp_path):
    """What the lifelong benchmark resumes from in a new session: each batch's targets and prefixes,
    spread again on the rebuilt weights with the rebuilt history, give the same bits."""
    from pipeline.editing.driver import Replay
    from pipeline.editing.history import extended

    model, tok = llama
    hp = HP.replace(solver="null_space", null_space_share=0.9, null_space_alpha=1e-4, norm_anchor=True)
    base = copy.deepcopy(model.state_dict())
    unedited = copy.deepcopy(model)
    runs, history = [], {}
    for lo in (0, 2):
        res = _edit(model, tok, corpus_path, tmp_path, COUNTERFACT_RECORDS[lo:lo + 2], hp, apply=True,
                    history=history or None, unedited=unedited)
        runs.append(res)
        history = extended(history, res.keys)
    edited = copy.deepcopy(model.state_dict())
    model.load_state_dict(base)
    rebuilt: dict = {}
    for lo, res in zip((0, 2), runs):  # no unedited model needed: the anchored targets are recorded
        again = _edit(model, tok, corpus_path, tmp_path, COUNTERFACT_RECORDS[lo:lo + 2], hp, apply=True,
                      history=rebuilt or None, replay=Replay(res.values, res.prefixes))
        assert again.prefixes == res.prefixes and all(torch.equal(again.deltas[k], res.deltas[k]) for k in res.deltas)
        rebuilt = extended(rebuilt, again.keys)
    assert all(torch.equal(model.state_dict()[k], edited[k]) for k in edited)
    assert all(torch.equal(rebuilt[k], history[k]) for k in history)
