"""Checkpoints (tiny model, fake deltas): a checkpoint changes no bit of any state — every state
rebuilt from it equals the state replayed from the base, `verify --replay` from the checkpoint and
from the base agree — readers start at it (and read the whole chain when an entry refers to one
before it), and what it seals is still checked by `verify --full`."""

from __future__ import annotations

import copy

import pathspec
import pytest
import torch

from pipeline.ledger import append_revert, entries, materialize, verify
from pipeline.ledger.append import add_checkpoint, batches_since_checkpoint, checkpoint_due
from pipeline.ledger.commit import commit_checkpoint
from pipeline.ledger.errors import LedgerError
from pipeline.ledger.layout import DVCIGNORE_FILE, SNAPSHOT_FILE, scan, seal_patterns
from pipeline.ledger.store import load
from pipeline.ledger.weights import Replayer
from pipeline.ledger.store import load_deltas
from pipeline.models.loading import model_fingerprint
from pipeline.stages.summary import ledger_table, parquet_bytes
from test_ledger_support import add, same_weights, tiny_model


def checkpoint(ledger, base) -> str:
    path = add_checkpoint(ledger)
    commit_checkpoint(path, copy.deepcopy(base), parquet_bytes(ledger_table(ledger, before_seq=int(path.name[:4]))))
    return path.name


def from_base(ledger, base, dirname: str):
    """The state after ``dirname`` replayed from the base over the whole chain (no checkpoint used)."""
    chain, states = load(ledger)
    by_id = {e.id: e for e in chain}
    model = copy.deepcopy(base)
    Replayer(model, lambda eid: load_deltas(by_id[eid])).goto(states[[e.dirname for e in chain].index(dirname)].ops)
    return model


@pytest.fixture
def ledger(tmp_path):
    base = tiny_model()
    fp = model_fingerprint(base)
    L = tmp_path / "ledger"
    model = copy.deepcopy(base)
    for n in range(1, 5):
        add(L, model, n, fp)
    assert checkpoint_due(L, 4) and not checkpoint_due(L, 5)
    ck = checkpoint(L, base)
    assert batches_since_checkpoint(L) == 0 and not checkpoint_due(L, 4)
    for n in (5, 6):
        add(L, model, n, fp)
    return {"L": L, "base": base, "fp": fp, "ck": ck, "model": model}


def test_a_checkpoint_changes_no_bit_of_any_state(ledger):
    L, base, ck = ledger["L"], ledger["base"], ledger["ck"]
    chain = entries(L)
    c = chain[4]
    assert c.dirname == ck and c.kind == "checkpoint" and c.content["covers"] == 4
    assert c.fingerprints["after"] == c.fingerprints["before"]
    assert c.fingerprints["after"]["model"] == chain[3].fingerprints["after"]["model"]
    assert [e.seq for e in chain] == list(range(1, 8)) and chain[-1].active["n"] == 6
    for e in chain[4:]:  # rebuilt from the checkpoint's saved weights = replayed from the base, bit for bit
        assert same_weights(materialize(L, e.dirname, base), from_base(L, base, e.dirname))
    assert same_weights(materialize(L, None, base), ledger["model"])
    fast = verify(L, replay=True, load_base=lambda: copy.deepcopy(base))
    full = verify(L, replay=True, load_base=lambda: copy.deepcopy(base), full=True)
    assert fast.ok and full.ok, (fast.message(), full.message())
    assert (fast.checked, fast.sealed, fast.from_checkpoint) == (3, 4, ck) and (full.checked, full.sealed) == (7, 0)
    assert f"from checkpoint {ck}, which seals the 4 before it" in fast.message()
    spec = pathspec.GitIgnoreSpec.from_lines((L / DVCIGNORE_FILE).read_text().splitlines())
    assert [spec.match_file(d.name + "/") for d in scan(L)] == [True] * 4 + [False] * 3  # sealed from DVC


@pytest.mark.parametrize("before", [2, 5, 21, 100, 1041, 9999, 10000, 10001, 123457])
def test_seal_patterns_match_exactly_the_batches_before(before):
    spec = pathspec.GitIgnoreSpec.from_lines(seal_patterns(before))
    probe = sorted({1, 2, 9, 10, 19, 20, 99, 100, 999, 1000, 1039, 1040, 1041, 9998, 9999, 10000, 10001, 99999,
                    100000, 123456, 123457, before - 1, before, before + 1} - {0})
    for seq in probe:
        name = f"{seq:04d}-0123456789ab/"
        assert spec.match_file(name) == (seq < before), (before, seq)
    assert len(seal_patterns(before)) <= 10 * len(str(before))


def test_readers_start_at_the_checkpoint_and_still_see_everything(ledger):
    L = ledger["L"]
    fast_chain, _ = load(L, since_checkpoint=True)
    assert [e.dirname for e in fast_chain] == [ledger["ck"], *[d.name for d in scan(L)[5:]]]
    log = ledger_table(L)
    assert list(log["seq"]) == list(range(1, 8)) and list(log["status"]) == ["committed"] * 7
    assert list(log["active"]) == [True, True, True, True, False, True, True]  # a checkpoint is no edit
    assert list(log["n_active_requests"]) == [2, 4, 6, 8, 8, 10, 12]
    # a revert to an entry the checkpoint sealed: readers fall back to the whole chain, correctly
    append_revert(L, "2")
    log = ledger_table(L)
    assert list(log["active"])[:7] == [True, True, False, False, False, False, False]
    model = materialize(L, None, ledger["base"])
    assert model_fingerprint(model) == entries(L)[1].fingerprints["after"]["model"]
    assert verify(L, replay=True, load_base=lambda: copy.deepcopy(ledger["base"])).ok


def test_what_a_checkpoint_seals_is_checked_by_verify_full(ledger):
    L = ledger["L"]
    sealed = scan(L)[1].path / "entry.json"
    data = sealed.read_bytes()
    sealed.write_bytes(data.replace(b'"kind"', b'"kinD"'))
    assert verify(L).ok  # sealed: the default check starts at the checkpoint
    r = verify(L, full=True)
    assert not r.ok and r.first_bad.dirname == scan(L)[1].name
    sealed.write_bytes(data)
    snap = L / ledger["ck"] / SNAPSHOT_FILE
    raw = bytearray(snap.read_bytes())
    raw[-3] ^= 0x01
    snap.write_bytes(bytes(raw))
    r = verify(L)
    assert not r.ok and r.first_bad.dirname == ledger["ck"] and SNAPSHOT_FILE in r.first_bad.reason


def test_a_checkpoint_needs_a_computed_history(tmp_path):
    base = tiny_model()
    L = tmp_path / "ledger"
    with pytest.raises(LedgerError, match="empty"):
        add_checkpoint(L)
    model = copy.deepcopy(base)
    add(L, model, 1, model_fingerprint(base))
    checkpoint(L, base)
    with pytest.raises(LedgerError, match="already is a checkpoint"):
        add_checkpoint(L)
    assert torch.equal(*(dict(m.named_parameters())["model.layers.0.mlp.down_proj.weight"]
                         for m in (materialize(L, None, base), model)))
