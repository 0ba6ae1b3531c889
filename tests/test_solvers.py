"""Update rules as data, and the canonical form of hyper-parameters that entry ids hash (issue 17)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import pipeline
from conftest import COUNTERFACT_RECORDS
from pipeline.editing.hparams import HParams, HParamsError
from pipeline.editing.solvers import SOLVERS, LayerSystem, Solver, closed_form_update
from pipeline.ledger.entry import edit_content, entry_id
from pipeline.models.adapters import adapter_for
from pipeline.requests import parse_requests

HP = HParams(layers=(1, 2), v_num_grad_steps=4, v_lr=0.5, mom2_update_weight=100.0, loss_stop=1e-6,
             context_starters=("The",), context_length=3, cov_max_length=32)


def test_a_registered_rule_is_selected_by_its_name_and_gets_the_history(llama, corpus_path, tmp_path, monkeypatch):
    """A toy rule (ridge: the covariance replaced by the identity) added as one registry entry: the
    driver calls it for every written layer, with the history state it was given for that layer."""
    model, tok = llama
    seen = []

    def toy(system, hp):
        seen.append(system)
        eye = torch.eye(system.keys.shape[1], dtype=torch.float64)
        return closed_form_update(system.keys, system.resid, eye, system.lam), {}

    monkeypatch.setitem(SOLVERS, "toy", Solver(toy))
    d_in = adapter_for(model).in_out_dims(model, "mlp_out", 2)[0]
    history = {"mlp_out@2": torch.eye(d_in, dtype=torch.float64)}
    kw = dict(method="pmet", corpus=corpus_path, cache_dir=tmp_path, progress=False)
    res = pipeline.edit(model, tok, copy.deepcopy(COUNTERFACT_RECORDS[:2]), hparams=HP.replace(solver="toy"),
                        history=history, **kw)
    assert len(seen) == 2 and seen[0].history is None and seen[1].history is history["mlp_out@2"]
    # the first written layer's delta is the toy rule's own result on what it was given (up to the
    # float32 rounding of W + Δ − W)
    name = adapter_for(model).parameter_name("mlp_out", 1)
    torch.testing.assert_close(res.deltas[name], toy(seen[0], HP)[0].float(), atol=1e-7, rtol=0)
    default = pipeline.edit(model, tok, copy.deepcopy(COUNTERFACT_RECORDS[:2]), hparams=HP, **kw)
    assert not torch.equal(default.deltas[name], res.deltas[name])


def test_an_unknown_rule_is_rejected_and_the_rule_is_hashed():
    with pytest.raises(HParamsError, match="solver must be one of closed_form, joint, null_space"):
        HP.replace(solver="nope")
    assert "solver" not in HP.to_dict()  # the default: old entries keep their ids
    reqs = parse_requests(copy.deepcopy(COUNTERFACT_RECORDS[:1]))
    ids = {entry_id(edit_content(None, "f" * 64, reqs, "pmet", h, {})) for h in (HP, HP.replace(solver="closed_form"))}
    assert len(ids) == 1


# Canonical form 1 of HParams(layers=(1, 2)): what batch.yaml holds and entry ids hash.  Pinned here:
# if this changes, the ids of existing entries' settings change with it.
FORM_1 = {
    "layers": [1, 2], "mom2_update_weight": 15000.0, "clamp_norm_factor": 0.75, "v_num_grad_steps": 25,
    "v_batch_requests": 25, "v_lr": 0.5, "v_weight_decay": 0.5, "kl_factor": 0.0625, "nll_weight": 1.0,
    "nll_weight_after_argmax": None, "kl_stop": 0.01, "loss_stop": 0.05,
    "context_starters": ["The", "Therefore", "Because", "I", "You"], "context_length": 10, "context_seed": 0,
    "cov_max_texts": 0, "cov_max_length": 256, "cov_batch_tokens": 8192, "v_dtype": "float32",
    "cov_dtype": "float32", "v_attention": "model", "v_workers": 1,
}


def test_the_canonical_form_is_pinned():
    assert HParams(layers=(1, 2)).to_dict() == FORM_1
    assert HParams.from_dict(FORM_1) == HParams(layers=(1, 2))


def test_adding_a_field_with_a_default_changes_no_canonical_form():
    """A later version's HParams with one more field: settings that leave it at its default have
    exactly the canonical form (hence the entry id) they had before; setting it is hashed."""
    later = dataclasses.make_dataclass("LaterHParams", [("brand_new_weight", float, dataclasses.field(default=0.5))],
                                       bases=(HParams,), frozen=True)
    for hp in (HParams(layers=(1, 2)), HP, HP.replace(iterative=True, neighbors=2)):
        assert later(**vars(hp)).to_dict() == hp.to_dict()
    assert later(layers=(1, 2), brand_new_weight=2.0).to_dict() == {**FORM_1, "brand_new_weight": 2.0}


def test_the_joint_rule_applied_batch_after_batch_equals_one_batch_of_every_request():
    """Recursive least squares: with residuals read on the current weights and the earlier keys in
    the normal matrix, three sequential updates sum to the single solve over all three batches from
    the unedited weights; the plain closed form (each batch regularised on its own) does not."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out, lam = 12, 7, 3.0
    a = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    cov = a @ a.T / d_in + 0.1 * torch.eye(d_in, dtype=torch.float64)
    w0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    batches = [(torch.randn(n, d_in, generator=g, dtype=torch.float64),
                torch.randn(n, d_out, generator=g, dtype=torch.float64)) for n in (4, 5, 3)]
    hp = HP.replace(solver="joint")

    def stream(rule: str) -> torch.Tensor:
        w, history = w0.clone(), None
        for keys, values in batches:
            system = LayerSystem(keys, values - keys @ w.T, cov, lam, history)
            upd, _ = SOLVERS[rule].solve(system, hp)
            w += upd
            history = keys.T @ keys if history is None else history + keys.T @ keys
        return w

    k_all = torch.cat([k for k, _ in batches])
    r0 = torch.cat([v for _, v in batches]) - k_all @ w0.T
    one_batch = w0 + closed_form_update(k_all, r0, cov, lam)
    torch.testing.assert_close(stream("joint"), one_batch, rtol=1e-10, atol=1e-10)
    assert (stream("closed_form") - one_batch).abs().max() > 1e-2
