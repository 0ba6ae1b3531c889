"""A ledger written by an earlier version (tests/fixtures/ledger_v1, made by the code of bd8042f with
tests/fixtures/make_ledger_v1.py) still verifies, replays bit for bit, and keeps its entry ids."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.editing.hparams import HParams
from pipeline.ledger import append_revert, entries, materialize, verify
from pipeline.models.loading import load_model, model_fingerprint
from pipeline.stages.dvcfile import batch_stages

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ledger_v1"


@pytest.fixture
def old(tmp_path):
    """A copy of the fixture (the tests may append to it)."""
    shutil.copytree(FIXTURE, tmp_path / "v1")
    return tmp_path / "v1"


def _base(old):
    return load_model(old / "model").model


def test_an_old_ledger_verifies_and_replays_bit_for_bit(old):
    chain = entries(old / "ledger")
    assert [e.kind for e in chain] == ["edit", "edit", "edit", "revert"]
    assert model_fingerprint(_base(old)) == chain[0].base_fingerprint
    result = verify(old / "ledger", replay=True, load_base=lambda: _base(old))
    assert result.ok and result.checked == 4 and result.replayed, result.message()
    for e in chain:  # every past state, rebuilt by this code, is the recorded one
        model = materialize(old / "ledger", e.dirname, _base(old))
        assert model_fingerprint(model) == e.fingerprints["after"]["model"]


def test_old_hyper_parameters_keep_their_canonical_form_and_stage_files(old):
    """The ids of old entries hash their recorded hyper-parameters; this code reads them into the
    same canonical form (fields added since are at their defaults, so they do not appear), and a
    batch with the same settings gets the stage file the old one has."""
    edits = [e for e in entries(old / "ledger") if e.kind == "edit"]
    assert {e.method for e in edits} == {"pmet", "memit"} and any(e.hparams.get("iterative") for e in edits)
    for e in edits:
        assert HParams.from_dict(e.hparams).to_dict() == e.hparams
        assert e.dirname == f"{e.seq:04d}-{e.batch.hash12(e.requests)}"
    for e in entries(old / "ledger"):  # the same stages, and one output more since: the edit's keys
        stages = batch_stages(e.batch)["stages"]
        if "keys_values" in stages:
            stages["apply"]["outs"].remove("keys.safetensors")
        assert stages == yaml.safe_load((e.path / "dvc.yaml").read_text())["stages"]


def test_this_code_appends_to_an_old_ledger(old):
    entry = append_revert(old / "ledger", "base")
    assert entry.seq == 5 and entry.parent == entries(old / "ledger")[3].id
    result = verify(old / "ledger", replay=True, load_base=lambda: _base(old))
    assert result.ok and result.checked == 5, result.message()
