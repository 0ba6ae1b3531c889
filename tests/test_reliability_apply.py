"""The apply path refuses to activate a bad batch, and the previous state stays active:

* non-finite values during the value optimisation (keys_values stage) or in the update (apply
  stage) stop the batch with a clear error before anything is written;
* deltas that overflow the weights they are added to are refused at the commit;
* the collapse guard (``guard.max_ppl_ratio``) records a batch whose ME-PPL perplexity rises too far
  as a *refused* entry that changes no weights; the chain goes on from the last good state.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch
import yaml

from conftest import poison_losses
from pipeline.editing.solvers import SOLVERS
from pipeline.ledger import LedgerError, active_chain, entries, materialize, verify
from pipeline.ledger.append import append_edit
from pipeline.models.loading import load_model, model_fingerprint
from pipeline_support import RECORDS
from reliability_support import project_with_one_batch, cli, compute, requests_file, tree_digest
from test_ledger_support import HP, COV, batch_requests, tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    return project_with_one_batch(tmp_path_factory.mktemp("apply"))


def copy_of(repo, name):
    dest = repo.parent / name
    shutil.copytree(repo, dest, symlinks=True)
    return dest


def pending_batch(repo, name, records):
    out = cli(repo, "add", "--requests", requests_file(repo, name, records)).stdout
    return repo / out.split()[1].rstrip(":")


def assert_previous_state_active(repo, ids_before):
    L = repo / "ledger"
    assert [e.id for e in active_chain(L)] == ids_before
    r = verify(L, replay=True, load_base=lambda: load_model(repo / "data" / "model").model)
    assert r.ok and r.checked == len(ids_before), r.message()


def test_a_non_finite_loss_stops_the_batch_before_anything_is_written(one_batch, monkeypatch):
    repo = copy_of(one_batch, "nan-loss")
    ids = [e.id for e in entries(repo / "ledger")]
    d = pending_batch(repo, "b2", RECORDS[2:4])
    poison_losses(monkeypatch)
    before = tree_digest(repo)
    res = cli(repo, "stage", "keys-values", "--batch", d, code=2)
    # the value-optimisation progress bar may precede it; the error is the last line
    assert res.stderr.strip().splitlines()[-1].startswith("error: non-finite loss at step 0 for request(s) [0, 1]; lower v_lr")
    assert tree_digest(repo) == before  # no keys_values.parquet, no trace, nothing else
    assert_previous_state_active(repo, ids)


def test_a_non_finite_update_stops_the_batch_before_anything_is_written(one_batch, monkeypatch):
    repo = copy_of(one_batch, "inf-update")
    ids = [e.id for e in entries(repo / "ledger")]
    d = pending_batch(repo, "b2", RECORDS[2:4])
    cli(repo, "stage", "keys-values", "--batch", d)
    for name, rule in list(SOLVERS.items()):  # whichever rule params.yaml ships, it returns inf
        monkeypatch.setitem(SOLVERS, name, dataclasses.replace(rule, solve=lambda system, hp: (torch.full(
            (system.resid.shape[1], system.keys.shape[1]), float("inf")), {})))
    before = tree_digest(repo)
    res = cli(repo, "stage", "apply", "--batch", d, code=2)
    assert res.stderr.strip().startswith(f"error: {d.name}: non-finite update at layer 1 (mlp_out)")
    assert "the previous state stays active" in res.stderr
    assert tree_digest(repo) == before  # no entry.json, deltas or state.json
    assert_previous_state_active(repo, ids)
    monkeypatch.undo()
    cli(repo, "stage", "apply", "--batch", d)  # with the fault gone the same batch commits
    assert len(active_chain(repo / "ledger")) == 2


def test_deltas_that_overflow_the_weights_are_refused_at_the_commit(tmp_path):
    base = tiny_model()
    fp = model_fingerprint(base)
    L, model = tmp_path / "ledger", copy.deepcopy(base)
    name = "model.layers.0.mlp.down_proj.weight"
    huge = {name: torch.full_like(dict(model.named_parameters())[name], 3e38)}
    e1 = append_edit(L, fp, batch_requests(1), "fake", HP, COV, huge, model=model)  # 3e38 + w: finite
    with pytest.raises(LedgerError, match=f"adding the deltas makes {name} non-finite"):
        append_edit(L, fp, batch_requests(2), "fake", HP, COV, huge, model=model)  # 6e38: inf
    assert model_fingerprint(model) == e1.fingerprints["after"]["model"]  # the model was restored
    assert [e.id for e in entries(L)] == [e1.id] and verify(L, replay=True, load_base=lambda: copy.deepcopy(base)).ok


def set_guard(repo, ratio):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["guard"] = {"max_ppl_ratio": ratio}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_the_collapse_guard_refuses_a_batch_and_keeps_the_previous_state(one_batch):
    repo = copy_of(one_batch, "guard")
    L = repo / "ledger"
    (e1,) = entries(L)
    # the shipped params.yaml has the guard on (2× the base perplexity): it judged batch 1 and let it in
    assert e1.content["guard"] == {"max_ppl_ratio": 2.0, "refused": False} and e1.metrics["guard"]["ratio"] < 2.0
    # a threshold that must trigger: perplexity would have to fall 1000-fold
    set_guard(repo, 1e-3)
    d2 = pending_batch(repo, "b2", RECORDS[2:4])
    cli(repo, "stage", "keys-values", "--batch", d2)
    out = cli(repo, "stage", "apply", "--batch", d2).stdout
    assert "REFUSED by the collapse guard" in out and "the previous state stays active" in out
    e2 = entries(L)[1]
    g = e2.metrics["guard"]
    assert e2.refused and e2.manifest["status"] == "refused" and e2.content["guard"] == {"max_ppl_ratio": 1e-3,
                                                                                         "refused": True}
    assert g["ratio"] == pytest.approx(g["ppl"] / g["base_ppl"]) and g["ratio"] > 1e-3 and g["base_ppl"] > 1
    assert e2.fingerprints["after"] == e2.fingerprints["before"]
    assert e2.fingerprints["before"]["model"] == e1.fingerprints["after"]["model"]
    assert (d2 / "deltas.safetensors").exists()  # what would have been applied is kept for the audit
    assert [e.id for e in active_chain(L)] == [e1.id]
    log = {r["seq"]: r for r in json.loads(cli(repo, "log", "--json").stdout)}
    assert (log[2]["status"], log[2]["active"]) == ("refused", False) and log[1]["active"] is True
    assert "ok: 2 entries verified (hash chain and replay)" in cli(repo, "verify", "--replay").stdout
    # a threshold that must not trigger: the next batch builds on the last good state (after 1)
    set_guard(repo, 100.0)
    d3 = pending_batch(repo, "b3", RECORDS[4:6])
    compute(repo, d3)
    e3 = entries(L)[2]
    assert not e3.refused and e3.content["guard"] == {"max_ppl_ratio": 100.0, "refused": False}
    assert e3.metrics["guard"]["base_ppl"] == g["base_ppl"]  # measured once, taken from entry 2
    assert e3.parent == e2.id and e3.fingerprints["before"]["model"] == e1.fingerprints["after"]["model"]
    assert [e.id for e in active_chain(L)] == [e1.id, e3.id]
    assert "ok: 3 entries verified (hash chain and replay)" in cli(repo, "verify", "--replay").stdout
    m = materialize(L, None, load_model(repo / "data" / "model").model)
    assert model_fingerprint(m) == e3.fingerprints["after"]["model"]
    # a refused entry cannot be dropped: it never was active
    assert "was refused by the collapse guard: it never was active" in cli(repo, "drop", "2", code=2).stderr
