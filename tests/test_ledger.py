"""The append-only ledger: hash chain, verify, replay, revert, drop, diff, errors, lock.

Tiny random Llama and fake deltas (see test_ledger_support); no real editing.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pipeline.ledger import (BASE, AlreadyRevertedError, AmbiguousIdError, BaseMismatchError, LedgerCorruptError,
                             LedgerError, LedgerLock, LedgerLockedError, NotActiveError, PendingDropError,
                             StateMismatchError, UnknownEntryError, active_chain, append_drop, append_revert, diff,
                             entries, entry_id, load_deltas, materialize, pending_drop, replay_plan, resolve_ref, show,
                             verify)
from pipeline.ledger.entry import drop_content, edit_content, revert_content
from pipeline.ledger.errors import EntrySchemaError
from pipeline.ledger.append import append_edit
from pipeline.models.loading import model_fingerprint
from test_ledger_support import COV, HP, PARAMS, add, batch_requests, fake_deltas, reference, same_weights, tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base():
    return tiny_model()


@pytest.fixture
def setup(tmp_path, base):
    """(ledger dir, working model at base, base fingerprint, loader of fresh base copies)."""
    return tmp_path / "ledger", copy.deepcopy(base), model_fingerprint(base), lambda: copy.deepcopy(base)


def ids(entries_):
    return [e.id for e in entries_]


def state_fn(model):
    """A fake editor whose result depends on the weights it is given (as a real one does)."""
    def reapply(entry, m):
        assert m is not model
        params = dict(m.named_parameters())
        n = entry.requests[0]["case_id"] // 10
        return {p: 1e-3 * torch.tanh(params[p]) + fake_deltas(m, 100 + n)[p] for p in PARAMS}
    return reapply


# ------------------------------------------------------------------------------------- hash chain

def test_append_builds_a_verifiable_hash_chain(setup, base):
    L, model, fp, load_base = setup
    made = [add(L, model, n, fp) for n in (1, 2, 3)]
    got = entries(L)
    assert ids(got) == ids(made)
    assert [e.seq for e in got] == [1, 2, 3]
    assert [e.parent for e in got] == [None, made[0].id, made[1].id]
    for e in got:
        # named at add time from the batch's own content (the id also covers parent and fingerprints)
        assert e.dirname == f"{e.seq:04d}-{e.batch.hash12(e.requests)}" and e.batch.parent == (
            got[e.seq - 2].dirname if e.seq > 1 else None)
        # committed in-process: no stage file (the pipeline's dvc.yaml is written by `editledger add`)
        assert sorted(os.listdir(e.path)) == ["batch.yaml", "deltas.safetensors", "entry.json",
                                              "requests.parquet", "state.json"]
        assert entry_id(json.loads((e.path / "entry.json").read_text())) == e.id
        m = e.manifest
        assert m["status"] == "committed" and m["approximate"] is False
        assert set(m["versions"]) >= {"torch", "transformers", "python", "editledger"}
        assert set(m["files"]) == {"entry.json", "deltas.safetensors", "batch.yaml", "requests.parquet"}
        assert m["fingerprints"]["after"]["params"]["names"] == sorted(PARAMS)
        assert m["metrics"]["efficacy"] == e.seq / 10
    assert got[0].fingerprints["before"]["model"] == fp
    assert model_fingerprint(model) == got[-1].fingerprints["after"]["model"]
    assert ids(active_chain(L)) == ids(made)
    r = verify(L)
    assert r.ok and r.checked == 3 and r.first_bad is None and not r.replayed
    r = verify(L, replay=True, load_base=load_base)
    assert r.ok and r.replayed, r.message()
    assert show(L, made[1].id[:6]).id == made[1].id
    assert show(L, "0002").id == made[1].id and show(L, "2").id == made[1].id
    assert show(L, made[1].dirname).id == made[1].id


def test_entry_id_is_content_addressed(setup):
    L, model, fp, _ = setup
    args = dict(parent=None, base_fingerprint=fp, requests=batch_requests(1), method="pmet", hparams=HP,
                covariance_ids=COV)
    ref = entry_id(edit_content(**args))
    assert entry_id(edit_content(**args)) == ref
    variants = [dict(parent="a" * 64), dict(base_fingerprint="0" * 64), dict(requests=batch_requests(2)),
                dict(method="memit"), dict(hparams={**HP, "v_lr": 0.25}), dict(covariance_ids={"mlp_out@0": "x"})]
    for change in variants:
        assert entry_id(edit_content(**{**args, **change})) != ref, change
    # EditRequest/HParams objects hash exactly like their plain-dict forms
    from pipeline.editing.hparams import HParams
    from pipeline.requests import parse_requests

    hp = HParams(layers=(0, 1))
    objs = edit_content(**{**args, "requests": parse_requests(batch_requests(1)), "hparams": hp})
    assert entry_id(objs) == entry_id(edit_content(**{**args, "hparams": hp.to_dict()})) != ref
    assert objs["requests"] == edit_content(**args)["requests"]
    r1 = entry_id(revert_content("a" * 64, fp, "b" * 64))
    assert r1 != entry_id(revert_content("a" * 64, fp, BASE))
    d1 = entry_id(drop_content("a" * 64, fp, "b" * 64, "exact"))
    assert d1 != entry_id(drop_content("a" * 64, fp, "b" * 64, "fast")) and d1 != r1
    # deltas are a result, not part of the identity: same batch, other deltas → same id
    e1 = append_edit(L, fp, batch_requests(1), "pmet", HP, COV, fake_deltas(model, 1), model=copy.deepcopy(model))
    e2 = append_edit(L.with_name("other"), fp, batch_requests(1), "pmet", HP, COV, fake_deltas(model, 7),
                     model=copy.deepcopy(model))
    assert e1.id == e2.id == ref
    assert e1.manifest["files"]["deltas.safetensors"] != e2.manifest["files"]["deltas.safetensors"]


# ---------------------------------------------------------------------------------------- replay

def test_materialize_is_bit_exact(setup, base):
    L, model, fp, _ = setup
    d = {n: fake_deltas(model, n) for n in (1, 2, 3)}
    made = [add(L, model, n, fp) for n in (1, 2, 3)]
    for k, e in enumerate(made, 1):
        m = materialize(L, e.id[:8], base)
        assert same_weights(m, reference(base, [(d[n], 1) for n in range(1, k + 1)]))
        assert model_fingerprint(m) == e.fingerprints["after"]["model"]
        assert all(torch.equal(load_deltas(e)[p], d[k][p]) for p in PARAMS)
    assert same_weights(materialize(L, None, base), model)
    assert same_weights(materialize(L, "base", base), base)
    target = copy.deepcopy(base)
    assert materialize(L, "0002", target, inplace=True) is target
    assert model_fingerprint(target) == made[1].fingerprints["after"]["model"]
    with pytest.raises(BaseMismatchError):
        materialize(L, None, tiny_model(seed=1))


# ---------------------------------------------------------------------------------------- revert

def test_revert_chains_and_errors(setup, base):
    L, model, fp, load_base = setup
    e1, e2, e3 = (add(L, model, n, fp) for n in (1, 2, 3))
    r1 = append_revert(L, e1.id[:10])
    assert r1.kind == "revert" and r1.target == e1.id and r1.seq == 4
    assert ids(active_chain(L)) == [e1.id]
    assert r1.fingerprints["after"] == e1.fingerprints["after"]
    assert same_weights(materialize(L, None, base), reference(base, [(fake_deltas(model, 1), 1)]))
    with pytest.raises(AlreadyRevertedError, match="already is the state after"):
        append_revert(L, e1.id)  # the state after e1 is already active
    with pytest.raises(AlreadyRevertedError, match="already reverted.*0004"):
        append_revert(L, "3")  # e3 was reverted by entry 0004
    with pytest.raises(UnknownEntryError):
        append_revert(L, "f" * 12 if not any(e.id.startswith("f" * 12) for e in entries(L)) else "e" * 12)
    with pytest.raises(UnknownEntryError):
        append_revert(L, "0042")
    model = materialize(L, None, base)
    e5 = add(L, model, 5, fp)
    assert ids(active_chain(L)) == [e1.id, e5.id]
    assert ids(active_chain(L, upto="0003")) == [e1.id, e2.id, e3.id]  # history stays queryable
    r2 = append_revert(L, "base")
    assert active_chain(L) == [] and r2.fingerprints["after"]["model"] == fp
    assert same_weights(materialize(L, None, base), base)
    with pytest.raises(AlreadyRevertedError):
        append_revert(L, "base")
    with pytest.raises(AlreadyRevertedError, match="by entry 0006"):
        append_revert(L, "0004")  # going forward again is a new edit, not a revert
    assert verify(L, replay=True, load_base=load_base).ok


def test_revert_only_goes_back_in_history(setup):
    L, model, fp, _ = setup
    e1, e2 = add(L, model, 1, fp), add(L, model, 2, fp)
    append_revert(L, "base")
    with pytest.raises(AlreadyRevertedError, match="not in the active"):
        append_revert(L, e1.id)
    assert len(entries(L)) == 3


# ------------------------------------------------------------------------------------------ drop

def test_drop_fast_subtracts_and_is_flagged_approximate(setup, base):
    L, model, fp, load_base = setup
    d = {n: fake_deltas(model, n) for n in (1, 2, 3)}
    e1, e2, e3 = (add(L, model, n, fp) for n in (1, 2, 3))
    res = append_drop(L, e2.id[:8], "fast", base_model=base)
    (drop,) = res.entries
    assert drop.kind == "drop" and drop.mode == "fast" and drop.approximate and drop.manifest["approximate"]
    assert ids(active_chain(L)) == [e1.id, e3.id]
    assert [(e.id, s) for e, s in replay_plan(L)] == [(e1.id, 1), (e2.id, 1), (e3.id, 1), (e2.id, -1)]
    expected = reference(base, [(d[1], 1), (d[2], 1), (d[3], 1), (d[2], -1)])
    assert same_weights(res.model, expected) and same_weights(materialize(L, None, base), expected)
    assert model_fingerprint(res.model) == drop.fingerprints["after"]["model"]
    exact = reference(base, [(d[1], 1), (d[3], 1)])  # what an exact drop would give: close, not equal
    for (n, a), b in zip(expected.named_parameters(), exact.parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    model = res.model
    e4 = add(L, model, 4, fp)
    assert e4.approximate  # later states inherit the flag
    v = verify(L, replay=True, load_base=load_base)
    assert v.ok and any("approximate" in w for w in v.warnings)
    with pytest.raises(NotActiveError, match="not active"):
        append_drop(L, e2.id, "fast", base_model=base)


def test_drop_exact_reapplies_later_batches(setup, base):
    L, model, fp, load_base = setup
    d = {n: fake_deltas(model, n) for n in (1, 2, 3, 4)}
    e1, e2, e3, e4 = (add(L, model, n, fp) for n in (1, 2, 3, 4))
    calls = []

    def reapply(entry, m):
        calls.append(entry.id)
        return state_fn(model)(entry, m)

    res = append_drop(L, "0002", "exact", base_model=base, reapply=reapply)
    drop, r3, r4 = res.entries
    assert calls == [e3.id, e4.id]
    assert drop.kind == "drop" and drop.mode == "exact" and not drop.approximate
    assert drop.reapply_plan == (e3.id, e4.id)
    assert (r3.reapplies, r4.reapplies) == (e3.id, e4.id) and r3.requests == e3.requests
    assert [e.seq for e in entries(L)] == list(range(1, 8))
    assert ids(active_chain(L)) == [e1.id, r3.id, r4.id]
    assert ids(active_chain(L, upto=drop.id)) == [e1.id]
    # expected weights, built independently: base + d1, then each batch recomputed on the new state
    m = reference(base, [(d[1], 1)])
    for r in (e3, e4):
        apply_ = state_fn(model)(r, m)
        m = reference(m, [(apply_, 1)])
    assert same_weights(res.model, m) and same_weights(materialize(L, None, base), m)
    assert not torch.equal(load_deltas(r3)[PARAMS[0]], d[3][PARAMS[0]])  # recomputed, not copied
    assert same_weights(materialize(L, drop.id, base), reference(base, [(d[1], 1)]))
    assert verify(L, replay=True, load_base=load_base).ok
    # dropping the last batch exactly needs no callback
    res2 = append_drop(L, r4.id, "exact", base_model=base)
    assert [e.kind for e in res2.entries] == ["drop"] and ids(active_chain(L)) == [e1.id, r3.id]
    assert verify(L, replay=True, load_base=load_base).ok


def test_interrupted_exact_drop_resumes(setup, base):
    L, model, fp, load_base = setup
    e1, e2, e3, e4 = (add(L, model, n, fp) for n in (1, 2, 3, 4))
    fail = {"at": e4.id}

    def flaky(entry, m):
        if entry.id == fail["at"]:
            raise RuntimeError("editor crashed")
        return state_fn(model)(entry, m)

    with pytest.raises(RuntimeError, match="editor crashed"):
        append_drop(L, e2.id, "exact", base_model=base, reapply=flaky)
    chain = entries(L)
    assert [e.kind for e in chain[4:]] == ["drop", "edit"] and chain[5].reapplies == e3.id
    p = pending_drop(L)
    assert p is not None and p.target == e2.id and p.remaining == (e4.id,)
    assert ids(active_chain(L)) == [e1.id, chain[5].id]  # consistent, exact, just not finished
    v = verify(L, replay=True, load_base=load_base)
    assert v.ok and any("unfinished" in w for w in v.warnings)
    with pytest.raises(PendingDropError, match="unfinished"):
        add(L, materialize(L, None, base), 9, fp)
    with pytest.raises(PendingDropError):
        append_drop(L, e1.id, "fast", base_model=base)
    fail["at"] = None
    res = append_drop(L, e2.id, "exact", base_model=base, reapply=flaky)
    assert [e.reapplies for e in res.entries] == [e4.id]
    assert pending_drop(L) is None
    assert ids(active_chain(L)) == [e1.id, chain[5].id, res.entries[0].id]
    assert verify(L, replay=True, load_base=load_base).ok


def test_drop_errors(setup, base):
    L, model, fp, _ = setup
    e1, e2 = add(L, model, 1, fp), add(L, model, 2, fp)
    with pytest.raises(UnknownEntryError):
        append_drop(L, "0009", "fast", base_model=base)
    with pytest.raises(ValueError, match="reapply"):
        append_drop(L, e1.id, "exact", base_model=base)  # e2 must be recomputed
    with pytest.raises(ValueError, match="mode"):
        append_drop(L, e1.id, "sideways", base_model=base)
    with pytest.raises(BaseMismatchError):
        append_drop(L, e2.id, "fast", base_model=tiny_model(seed=1))
    r = append_revert(L, e1.id)
    with pytest.raises(LedgerError, match="only edit entries"):
        append_drop(L, r.id, "fast", base_model=base)
    with pytest.raises(NotActiveError, match="0003"):
        append_drop(L, e2.id, "fast", base_model=base)
    assert len(entries(L)) == 3


# ------------------------------------------------------------------------------- errors, lookups

def test_reference_resolution():
    fake = [SimpleNamespace(id="abcd1111" + "0" * 56, seq=1, dirname="0001-abcd11110000"),
            SimpleNamespace(id="abcd2222" + "0" * 56, seq=2, dirname="0002-abcd22220000"),
            SimpleNamespace(id="12345678" + "0" * 56, seq=3, dirname="0003-123456780000")]
    with pytest.raises(AmbiguousIdError, match="abcd"):
        resolve_ref(fake, "abcd")
    assert resolve_ref(fake, "ABCD2").seq == 2
    assert resolve_ref(fake, "3").seq == 3 and resolve_ref(fake, "0001").seq == 1
    assert resolve_ref(fake, "12345").seq == 3  # ≥5 digits: an id prefix
    assert resolve_ref(fake, "base") == BASE
    with pytest.raises(UnknownEntryError, match="no committed entry"):
        resolve_ref(fake, "ffff")
    with pytest.raises(UnknownEntryError, match="not an entry reference"):
        resolve_ref(fake, "abc")  # too short to be an id prefix
    with pytest.raises(UnknownEntryError, match="not an entry reference"):
        resolve_ref(fake, "xyz!")


def test_show_errors_and_append_checks(setup, base):
    L, model, fp, _ = setup
    with pytest.raises(LedgerError, match="no ledger"):
        show(L, "1")
    e1 = add(L, model, 1, fp)
    with pytest.raises(UnknownEntryError, match="0001"):
        show(L, "0007")
    with pytest.raises(LedgerError, match="not an entry"):
        show(L, "base")
    before = model_fingerprint(model)
    with pytest.raises(StateMismatchError):
        add(L, copy.deepcopy(base), 2, fp)  # a model at the base, not at the state after e1
    with pytest.raises(BaseMismatchError):
        add(L, model, 2, "0" * 64)
    bad = fake_deltas(model, 2)
    for broken, msg in [({"nope.weight": bad[PARAMS[0]]}, "unknown parameter"),
                        ({PARAMS[0]: bad[PARAMS[0]][:3]}, "shape"),
                        ({PARAMS[0]: bad[PARAMS[0]] * float("nan")}, "non-finite"), ({}, "non-empty")]:
        with pytest.raises(LedgerError, match=msg):
            append_edit(L, fp, batch_requests(2), "fake", HP, COV, broken, model=model)
    with pytest.raises(EntrySchemaError):
        append_edit(L, fp, [], "fake", HP, COV, bad, model=model)
    assert ids(entries(L)) == [e1.id] and model_fingerprint(model) == before
    e2 = add(L, model, 2, fp, apply=False)  # recorded, model restored
    assert model_fingerprint(model) == before and e2.fingerprints["before"]["model"] == before


# ------------------------------------------------------------------------------------------ lock

def test_second_writer_is_refused_while_readers_work(setup, base):
    L, model, fp, load_base = setup
    e1 = add(L, model, 1, fp)
    with LedgerLock(L):
        with pytest.raises(LedgerLockedError, match=f"process {os.getpid()}"):
            add(L, model, 2, fp)
        with pytest.raises(LedgerLockedError):
            LedgerLock(L).acquire()
        assert ids(entries(L)) == [e1.id] and verify(L, replay=True, load_base=load_base).ok
        assert show(L, "1").id == e1.id
    # another process holding the lock (plain flock, as LedgerLock does) is named by its pid
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, b'%d' % os.getpid()); "
            "print('locked', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(L / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(LedgerLockedError, match=f"process {child.pid}"):
            add(L, model, 2, fp)
        assert verify(L).ok
    finally:
        child.kill()
        child.wait()
    e2 = add(L, model, 2, fp)  # the kernel released the dead holder's lock
    assert ids(entries(L)) == [e1.id, e2.id]



@pytest.mark.parametrize("pid_after_s, named", [(0.3, True), (None, False)])
def test_refused_writer_waits_briefly_for_the_holders_pid(tmp_path, pid_after_s, named):
    """A writer refused in the window between the holder's flock and its pid write names the pid."""
    L = tmp_path / "ledger"
    L.mkdir()
    write = f"time.sleep({pid_after_s}); os.write(fd, b'%d' % os.getpid()); " if named else ""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); print('locked', flush=True); "
            f"{write}time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(L / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(LedgerLockedError, match=f"process {child.pid}" if named else "another process"):
            LedgerLock(L).acquire()
    finally:
        child.kill()
        child.wait()
    with LedgerLock(L) as lock:  # the holder died: free again
        assert lock.held

# --------------------------------------------------------------------------------- tamper checks

def _busy_ledger(L, model, base, fp):
    """Every kind of entry: edits, exact drop with a re-application, revert, fast drop."""
    e1, e2, e3 = (add(L, model, n, fp) for n in (1, 2, 3))
    append_drop(L, e2.id, "exact", base_model=base, reapply=state_fn(model))
    append_revert(L, e1.id)
    model = materialize(L, None, base)
    e6 = add(L, model, 6, fp)
    append_drop(L, e6.id, "fast", base_model=base)
    return entries(L)


def test_any_flipped_byte_is_detected_and_named(setup, base):
    L, model, fp, load_base = setup
    chain = _busy_ledger(L, model, base, fp)
    assert [e.kind for e in chain] == ["edit", "edit", "edit", "drop", "edit", "revert", "edit", "drop"]
    assert verify(L, replay=True, load_base=load_base).ok
    rng = random.Random(0)
    flips = 0
    for e in chain:
        for name in sorted(os.listdir(e.path)):
            path = e.path / name
            data = path.read_bytes()
            positions = {0, len(data) - 1, len(data) // 2} | {rng.randrange(len(data)) for _ in range(12)}
            for pos in sorted(positions):
                mask = 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
                path.write_bytes(data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1:])
                try:
                    r = verify(L)
                    assert not r.ok, (e.dirname, name, pos)
                    assert r.first_bad.dirname == e.dirname, (name, pos, r.first_bad)
                    assert r.first_bad.entry_id in (None, e.id)
                    assert r.checked == e.seq - 1
                    flips += 1
                finally:
                    path.write_bytes(data)
    assert flips > 300
    assert verify(L, replay=True, load_base=load_base).ok


def test_missing_or_reordered_entries_are_detected(setup):
    L, model, fp, _ = setup
    e1, e2, e3 = (add(L, model, n, fp) for n in (1, 2, 3))
    away = L.parent / "away"
    e2.path.rename(away)
    r = verify(L)
    assert not r.ok and r.first_bad.dirname == e3.dirname and "missing" in r.first_bad.reason
    away.rename(e2.path)
    (e3.path / "state.json").rename(L.parent / "state3")  # e3 becomes incomplete: ignored, not an error
    r = verify(L)
    assert r.ok and r.incomplete == [e3.dirname] and r.checked == 2
    (L.parent / "state3").rename(e3.path / "state.json")
    assert verify(L).ok


def test_value_preserving_rewrite_is_detected(setup):
    """'1e-05' → '1E-05' parses to the same value: caught by the file hash, and by the canonical-bytes
    check even when the manifest is re-sealed to match (e.g. a tool that reformats JSON)."""
    from pipeline.ledger import atomic
    from pipeline.ledger.entry import manifest_digest

    L, model, fp, _ = setup
    add(L, model, 1, fp)
    e = add(L, model, 2, fp)
    path = e.path / "entry.json"
    data = path.read_bytes()
    assert b"1e-05" in data
    changed = data.replace(b"1e-05", b"1E-05")
    assert json.loads(changed) == json.loads(data)
    path.write_bytes(changed)
    r = verify(L)
    assert not r.ok and r.first_bad.dirname == e.dirname and "sha256" in r.first_bad.reason
    m = json.loads((e.path / "state.json").read_text())
    m["files"]["entry.json"] = atomic.sha256_bytes(changed)
    m["digest"] = manifest_digest(m)
    (e.path / "state.json").write_bytes(atomic.canonical_bytes(m))
    r = verify(L)
    assert not r.ok and r.first_bad.dirname == e.dirname and "canonical" in r.first_bad.reason
    with pytest.raises(LedgerCorruptError, match="canonical"):
        entries(L)


def test_replay_detects_a_wrong_recorded_fingerprint(setup, base):
    """A manifest re-sealed with a wrong 'after' fingerprint passes the hash checks, not replay."""
    from pipeline.ledger import atomic
    from pipeline.ledger.entry import manifest_digest

    L, model, fp, load_base = setup
    add(L, model, 1, fp)
    e = add(L, model, 2, fp)
    m = json.loads((e.path / "state.json").read_text())
    m["fingerprints"]["after"]["params"]["sha256"] = "0" * 64
    m["digest"] = manifest_digest(m)
    (e.path / "state.json").write_bytes(atomic.canonical_bytes(m))
    assert verify(L).ok
    r = verify(L, replay=True, load_base=load_base)
    assert not r.ok and r.first_bad.stage == "replay" and r.first_bad.entry_id == e.id
    assert verify(L, replay=True, load_base=lambda: tiny_model(seed=3)).first_bad.reason.startswith("the base")


# ------------------------------------------------------------------------------------------ diff

def test_diff_requests_norms_and_metrics(setup, base):
    L, model, fp, _ = setup
    e1, e2, e3 = (add(L, model, n, fp) for n in (1, 2, 3))
    res = append_drop(L, e2.id, "exact", base_model=base, reapply=state_fn(model))
    dd = diff(L, "0003", res.entries[-1].id)
    assert dd.requests_removed == e2.requests and dd.requests_added == []
    d0 = diff(L, "base", "1")
    assert d0.requests_added == e1.requests and d0.requests_removed == []
    assert d0.a.param_norms == {} and d0.a.metrics is None
    assert set(d0.b.layer_norms) == {"0", "1"}
    d1 = fake_deltas(model, 1)
    for p in PARAMS:
        assert d0.b.param_norms[p] == pytest.approx(float(d1[p].double().norm()), rel=1e-12)
    d13 = diff(L, "1", "3")
    assert d13.metric_changes["efficacy"]["change"] == pytest.approx(0.2)
    assert d13.metric_changes["fluency.ngram_entropy"] == {"a": 6.0, "b": 8.0, "change": 2.0}
    assert json.dumps(d13.to_dict())  # serialisable for the CLI
