"""The ledger holds the history state of the constrained rules (issue 18): each entry keeps its
keys; the history of a batch is what the *active* entries imply (after a revert or a drop too);
a constrained ledger replays bit for bit; the per-batch health is recorded."""

from __future__ import annotations

import json

import torch
import yaml

from pipeline.editing.history import history_of
from pipeline.ledger import append_drop, append_edit, append_revert, entries, verify
from pipeline.ledger.store import load_keys
from pipeline.models.loading import load_model, model_fingerprint
from pipeline.stages.common import Project, edit_history
from pipeline_support import RECORDS, cli, dvc, git, make_project, requests_file
from test_ledger_support import COV, HP, batch_requests, fake_deltas, tiny_model

NAME = "mlp_out@1"


def _keys(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {NAME: torch.randn(2, 48, generator=g), "mlp_out@0": torch.randn(2, 48, generator=g)}


def _append(root, model, fp, n):
    return append_edit(root / "ledger", fp, batch_requests(n), "fake", HP, COV, fake_deltas(model, n), {}, model=model,
                       keys=_keys(n))


class _Reapplied:
    """What a re-application returns: new deltas and the keys read on the new state."""

    def __init__(self, model, n):
        self.deltas, self.keys = fake_deltas(model, 100 + n), _keys(100 + n)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_history_follows_the_active_entries_through_drop_and_revert(tmp_path):
    model = tiny_model()
    fp = model_fingerprint(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    e = [_append(tmp_path, model, fp, n) for n in (1, 2, 3)]
    project = Project(tmp_path)
    assert [_same(load_keys(x), _keys(n)) for x, n in zip(e, (1, 2, 3))] == [True] * 3
    history, n, missing = edit_history(project, e[2].dirname)
    assert n == 3 and missing == [] and _same(history, history_of([_keys(1), _keys(2), _keys(3)]))

    # exact drop of batch 2: batch 3 is re-applied; the history is that of a ledger that never had 2
    model.load_state_dict(base)
    drop = append_drop(tmp_path / "ledger", e[1].dirname, "exact", base_model=model,
                       reapply=lambda original, m: _Reapplied(m, 3))
    after_drop = edit_history(project, drop.entries[-1].dirname)[0]
    other = tmp_path / "other"
    m2 = tiny_model()
    _append(other, m2, fp, 1)
    append_edit(other / "ledger", fp, batch_requests(3), "fake", HP, COV, fake_deltas(m2, 103), {}, model=m2,
                keys=_keys(103))
    assert _same(after_drop, edit_history(Project(other), entries(other / "ledger")[-1].dirname)[0])
    assert not _same(after_drop, history)

    # revert to batch 1: only its keys
    rev = append_revert(tmp_path / "ledger", e[0].dirname)
    assert _same(edit_history(project, rev.dirname)[0], history_of([_keys(1)]))
    # a second ledger shares nothing with the first
    assert _same(edit_history(Project(other), entries(other / "ledger")[0].dirname)[0], history_of([_keys(1)]))


def test_keys_are_covered_by_verify(tmp_path):
    model = tiny_model()
    entry = _append(tmp_path, model, model_fingerprint(model), 1)
    path = entry.path / "keys.safetensors"
    assert "keys.safetensors" in entry.manifest["files"] and verify(tmp_path / "ledger").ok
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    r = verify(tmp_path / "ledger")
    assert not r.ok and r.first_bad.dirname == entry.dirname and "keys.safetensors" in r.first_bad.reason


def test_a_null_space_ledger_through_dvc_replays_bit_for_bit(tmp_path):
    repo = make_project(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["edit"]["overrides"] = {"solver": "null_space", "null_space_share": 0.5, "null_space_alpha": 0.01}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "commit", "-qam", "null space")
    for i, records in enumerate((RECORDS[0:2], RECORDS[2:4], RECORDS[4:6])):
        assert "+ns" in cli(repo, "add", "--requests", str(requests_file(repo, f"b{i}", records))).output
    dvc(repo, "repro", "-P")
    ledger = repo / "ledger"
    e1, e2, e3 = entries(ledger)
    res = verify(ledger, replay=True, load_base=lambda: load_model(repo / "data" / "model").model)
    assert res.ok and res.checked == 3, res.message()
    health = [json.loads((e.path / "state.json").read_text())["metrics"]["health"] for e in (e1, e2, e3)]
    assert [h["history_entries"] for h in health] == [0, 1, 2]
    assert all(set(h["projector_rank"]) == {"mlp_out@1", "mlp_out@2"} for h in health)
    assert all(h["max_weight_norm_ratio"] > 1.0 for h in health)
    assert set(load_keys(e2)) == {"mlp_out@1", "mlp_out@2"}
    # the spectra live in the user cache, never in the pipeline's covariance outputs
    assert not list((repo / "data" / "covariance").rglob("*.eigh.safetensors"))
    assert list((tmp_path / "covcache").rglob("*.eigh.safetensors"))

    # drop batch 2 exactly: the re-applied batch 3 is constrained by batch 1 only
    cli(repo, "drop", "2")
    dvc(repo, "repro", "-P")
    reapplied = entries(ledger)[-1]
    assert reapplied.batch.reapplies == e3.dirname
    assert json.loads((reapplied.path / "state.json").read_text())["metrics"]["health"]["history_entries"] == 1
    res = verify(ledger, replay=True, load_base=lambda: load_model(repo / "data" / "model").model)
    assert res.ok, res.message()
