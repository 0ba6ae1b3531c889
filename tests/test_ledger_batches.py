"""Batch directories and the ledger commands, in-process and without DVC (fast).

batch.yaml round trip and naming, the generated dvc.yaml, atomic creation, the keys/values Parquet
round trip, covariance and data-stage errors, an interrupted exact drop, and the command line's
one-line errors (exit code 2).
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import COUNTERFACT_RECORDS, make_model, tokenizer
from pipeline.cli import app
from pipeline.editing.hparams import HParams
from pipeline.requests import parse_requests
from pipeline.editing.optimise import ValueResult
from pipeline.ledger import (Batch, BatchError, LedgerLock, PendingDropError, add_drop, add_edit, append, atomic,
                             entries, read_batch, scan)
from pipeline.ledger.batch import read_requests, write_batch_dir
from pipeline.stages.dvcfile import batch_dvc_yaml, batch_stages
from pipeline.models.loading import LoadedModel, model_fingerprint
from pipeline.stages.common import Project, StageError
from pipeline_support import TINY_HPARAMS, make_shared
from test_ledger_support import add, tiny_model

HP = {"layers": [1, 2], "v_lr": 0.5}


def edit_batch(seq=1, parent=None, **kw):
    return Batch(seq, "edit", parent, **{"method": "pmet", "engine": "fast", "seed": 0, "hparams": HP, **kw})


def test_batch_yaml_round_trip_name_and_stages():
    reqs = [r.canonical() for r in parse_requests(copy.deepcopy(COUNTERFACT_RECORDS[:2]))]
    b = edit_batch(3, "0002-aaaaaaaaaaaa")
    assert Batch.from_doc(yaml.safe_load(b.to_yaml())) == b
    # the name depends on what the batch is, not on where it sits
    assert b.hash12(reqs) == edit_batch(1).hash12(reqs) != edit_batch(3, "0002-aaaaaaaaaaaa", method="memit").hash12(reqs)
    assert b.dirname(reqs) == f"0003-{b.hash12(reqs)}" and b.hash12(reqs) != b.hash12(reqs[:1])
    stages = batch_stages(b)["stages"]
    assert list(stages) == ["keys_values", "apply", "evaluate"]
    assert stages["keys_values"]["deps"][0] == "../0002-aaaaaaaaaaaa/state.json"
    assert stages["apply"]["outs"][-1] == "state.json" and "../../data/covariance" in stages["apply"]["deps"]
    assert not any("state.json" in dep for dep in batch_stages(edit_batch())["stages"]["keys_values"]["deps"])
    rev = batch_stages(Batch(4, "revert", "0003-bbbbbbbbbbbb", target="base"))["stages"]
    assert list(rev) == ["apply"] and rev["apply"]["deps"] == ["../0003-bbbbbbbbbbbb/state.json", "batch.yaml"]
    for bad, match in [(dict(kind="move"), "kind"), (dict(seq=2, parent=None), "first batch"),
                       (dict(parent="0001-nothex"), "parent"), (dict(engine="slow"), "engine")]:
        with pytest.raises(BatchError, match=match):
            Batch(**{"seq": 1, "kind": "edit", "parent": None, "method": "pmet", "engine": "fast", "seed": 0,
                     "hparams": HP, **bad})
    with pytest.raises(BatchError, match="fast drop"):
        Batch(2, "drop", "0001-aaaaaaaaaaaa", target="0001-aaaaaaaaaaaa", mode="fast", reapply=("0001-aaaaaaaaaaaa",))
    with pytest.raises(BatchError, match="unexpected"):
        Batch.from_doc({**b.to_doc(), "colour": "red"})


def test_batch_directory_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    reqs = parse_requests(copy.deepcopy(COUNTERFACT_RECORDS[:2]))
    real = atomic.write_text

    def fail_on_dvc_yaml(path, text, **kw):
        if str(path).endswith("dvc.yaml"):
            raise OSError("disk full")
        return real(path, text, **kw)

    monkeypatch.setattr(atomic, "write_text", fail_on_dvc_yaml)
    with pytest.raises(OSError, match="disk full"):
        write_batch_dir(tmp_path, edit_batch(), reqs, batch_dvc_yaml)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    path = write_batch_dir(tmp_path, edit_batch(), reqs, batch_dvc_yaml)
    assert (path / "dvc.yaml").read_text() == batch_dvc_yaml(edit_batch())
    assert [d.name for d in scan(tmp_path)] == [path.name] and read_batch(path) == edit_batch()
    assert [r.canonical() for r in read_requests(path)] == [r.canonical() for r in reqs]
    assert read_requests(path)[0].record["paraphrase_prompts"]  # the full record travels along
    with pytest.raises(Exception, match="never replaced"):
        write_batch_dir(tmp_path, edit_batch(), reqs)


def test_keys_values_parquet_round_trip_is_bit_exact(tmp_path):
    from pipeline.stages.targets_file import read_targets, targets_table

    g = torch.Generator().manual_seed(0)
    t = {s: torch.randn(3, 8, generator=g) for s in ("attn", "mlp")}
    vr = ValueResult({s: v * 3 for s, v in t.items()}, t, {s: v * 2 for s, v in t.items()}, torch.tensor([4, 2, 7]))
    atomic.write_parquet(tmp_path / "kv.parquet", targets_table([vr], ["", "The cat. "], 2, {"values_s": 1.5}))
    (back,), meta = read_targets(tmp_path / "kv.parquet")
    assert meta["prefixes"] == ["", "The cat. "] and meta["layer"] == 2 and meta["timings"] == {"values_s": 1.5}
    for name in ("targets", "init", "deltas"):
        for s in ("attn", "mlp"):
            assert torch.equal(getattr(back, name)[s], getattr(vr, name)[s])
    assert torch.equal(back.steps, vr.steps)


def test_missing_covariance_is_a_clear_error(tmp_path, corpus_path):
    from pipeline.stages.covariance import cached_covariances

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"corpus": {"path": str(corpus_path)}}))
    model, tok = make_model("llama"), tokenizer(True)
    lm = LoadedModel(model, tok, tmp_path, model_fingerprint(model))
    hp = HParams(layers=(1,), cov_max_length=32)
    with pytest.raises(StageError, match="no covariance for mlp_out@1.*covariance:"):
        cached_covariances(Project(tmp_path), lm, [("mlp_out", 1)], hp)
    (tmp_path / "data" / "covariance" / "mlp_out-1").mkdir(parents=True)
    with pytest.raises(StageError, match="other settings"):
        cached_covariances(Project(tmp_path), lm, [("mlp_out", 1)], hp)


def test_data_stage_verifies_sums_and_converts(tmp_path):
    from pipeline.data import DataError
    from pipeline.stages import data

    shared = make_shared(tmp_path)
    repo = tmp_path / "repo"
    repo.mkdir()
    counts = data.run(Project(repo), "../shared/data")
    assert counts == {"counterfact": 10, "zsre": 1, "me_ppl_50": 1}
    import pandas as pd

    cf = pd.read_parquet(repo / "data" / "counterfact.parquet")
    assert list(cf["subject"][:2]) == ["Danielle Darrieux", "Edwin of Northumbria"] and cf["error"].isna().all()
    assert json.loads(cf["record"][0]) == COUNTERFACT_RECORDS[0]
    assert (repo / "data" / "wikitext" / "wikitext2_raw_test.txt").read_bytes() == \
        (shared / "wikitext" / "wikitext2_raw_test.txt").read_bytes()
    (shared / "zsre" / "zsre_dev.json").write_text("[]")
    with pytest.raises(DataError, match="SHA-256"):
        data.run(Project(repo), "../shared/data")


def test_an_interrupted_exact_drop_is_finished_by_the_same_drop(tmp_path, monkeypatch):
    L = tmp_path / "ledger"
    model = tiny_model()
    fp = model_fingerprint(model)
    e1, e2, e3 = (add(L, model, n, fp) for n in (1, 2, 3))
    real = append._write_reapplication
    calls = []

    def crash_on_second(*a):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(append, "_write_reapplication", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        add_drop(L, "1")  # drop + re-application of 2 written, re-application of 3 not
    monkeypatch.undo()
    assert [read_batch(d.path).kind for d in scan(L)] == ["edit"] * 3 + ["drop", "edit"]
    with pytest.raises(PendingDropError, match="interrupted"):
        add_edit(L, parse_requests(copy.deepcopy(COUNTERFACT_RECORDS[:1])), "pmet", HP)
    with pytest.raises(PendingDropError, match="interrupted"):
        add_drop(L, "2", "fast")
    (last,) = add_drop(L, "1")
    assert read_batch(last).reapplies == e3.dirname and len(scan(L)) == 6
    assert [e.id for e in entries(L)] == [e1.id, e2.id, e3.id]  # nothing computed yet


# ------------------------------------------------------------------------------------------ CLI

@pytest.fixture
def project_dir(tmp_path, monkeypatch):
    """A project without DVC or a model: enough for the commands that only write batch inputs."""
    (tmp_path / "hparams-tiny.yaml").write_text(yaml.safe_dump(TINY_HPARAMS))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "edit": {"hparams": "hparams-tiny.yaml"}, "covariance": {"layers": [1, 2], "roles": ["mlp_out"]}}))
    (tmp_path / "req.json").write_text(json.dumps(COUNTERFACT_RECORDS[:2]))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args, code=0):
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == code, (args, res.output, res.exception)
    return res.output


def test_cli_add_log_and_user_errors(project_dir):
    out = invoke("add", "--requests", "req.json")
    assert out.startswith("added ledger/0001-") and "2 requests, pmet" in out
    d = project_dir / "ledger" / out.split()[1].split("/")[1].rstrip(":")
    assert read_batch(d).hparams["layers"] == [1, 2] and read_batch(d).hparams["kl_factor"] == 1.0
    invoke("add", "--requests", "req.json", "--method", "memit", "--iterative")
    log = json.loads(invoke("log", "--json"))
    assert [(r["seq"], r["method"], r["modifiers"], r["status"], r["n_requests"]) for r in log] == [
        (1, "pmet", "", "pending", 2), (2, "memit", "+iterative", "pending", 2)]
    text = invoke("log")
    assert "pending" in text and "memit+iterative" in text
    # one line, exit code 2
    assert "computes covariances only for layers [1, 2] and roles ['mlp_out']" in invoke(
        "add", "--requests", "req.json", "--method", "pmet-attn-write", code=2)
    (project_dir / "bad.json").write_text('[{"subject": "X", "prompt": "no placeholder", "target_new": "Y"}]')
    assert "placeholder" in invoke("add", "--requests", "bad.json", code=2)
    assert "unknown method" in invoke("add", "--requests", "req.json", "--method", "rome", code=2)
    assert "not computed yet" in invoke("revert", "1", code=2)
    assert "not computed yet" in invoke("drop", "1", "--fast", code=2)
    assert "incomplete" in invoke("show", "2", code=2)
    with LedgerLock(project_dir / "ledger"):
        assert f"locked by process {os.getpid()}" in invoke("add", "--requests", "req.json", code=2)
    assert len(scan(project_dir / "ledger")) == 2


def test_cli_add_records_modifiers_and_rejects_bad_ones(project_dir):
    """--iterative / --neighbors are hashed hyper-parameters of the batch; bad values change nothing."""
    recs = copy.deepcopy(COUNTERFACT_RECORDS[:2])
    for r in recs:
        r["neighborhood_samples"] = [{"subject": "Montesquieu", "prompt": r["requested_rewrite"]["prompt"]}]
    (project_dir / "req_nb.json").write_text(json.dumps(recs))
    assert "needs a CounterFact record" in invoke("add", "--requests", "req.json", "--neighbors", "2", code=2)
    plain = invoke("add", "--requests", "req.json")
    it = invoke("add", "--requests", "req.json", "--iterative")
    nb = invoke("add", "--requests", "req_nb.json", "--neighbors", "2")
    assert "pmet+iterative;" in it and "pmet+na2;" in nb and "+" not in plain.split(",")[1]
    dirs = [project_dir / "ledger" / o.split()[1].split("/")[1].rstrip(":") for o in (plain, it, nb)]
    hps = [read_batch(d).hparams for d in dirs]
    assert "iterative" not in hps[0] and hps[1]["iterative"] is True and hps[2]["neighbors"] == 2
    assert len({d.name.split("-")[1] for d in dirs}) == 3  # different content hashes
    assert "neighbors must be an integer in 0..10" in invoke("add", "--requests", "req.json", "--neighbors", "-1",
                                                             code=2)
    assert "unknown method 'jeep-turbo'" in invoke("add", "--requests", "req.json", "--method", "jeep-turbo", code=2)
    assert len(scan(project_dir / "ledger")) == 3
