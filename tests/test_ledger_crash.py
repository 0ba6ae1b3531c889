"""Interrupted appends: an exception mid-append, and a real ``kill -9`` of a writer process.

Either way the ledger must still verify (replay included), its active chain must be what the
committed entries say, the interrupted directory must be reported as incomplete (not corrupt), and
a rerun must complete — in the same batch directory, whose name is fixed when it is added (the
scratch files of the interrupted attempt are replaced; ``state.json`` was never written).
"""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pipeline.ledger import (UnknownEntryError, active_chain, atomic, commit, entries, incomplete_entries, materialize,
                             show, verify)
from pipeline.models.loading import model_fingerprint
from test_ledger_support import add, tiny_model

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def test_exception_mid_append_leaves_an_ignored_incomplete_entry(tmp_path, monkeypatch):
    base = tiny_model()
    fp = model_fingerprint(base)
    L = tmp_path / "ledger"
    model = copy.deepcopy(base)
    e1 = add(L, model, 1, fp)
    state1 = model_fingerprint(model)

    def crash(*a, **k):
        raise RuntimeError("simulated crash")

    # 1) after entry.json, before the deltas
    monkeypatch.setattr(atomic, "write_safetensors", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        add(L, model, 2, fp)
    monkeypatch.undo()
    # 2) after the deltas, before state.json (the commit point)
    inputs = ["batch.yaml", "requests.parquet"]  # appended in-process: no stage file
    (inc,) = incomplete_entries(L)
    assert inc.startswith("0002-") and sorted(os.listdir(L / inc)) == sorted(inputs + ["entry.json"])
    monkeypatch.setattr(commit, "_write_state", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        add(L, model, 2, fp)  # the retry writes into the same directory, and dies again
    monkeypatch.undo()

    assert model_fingerprint(model) == state1  # the writer restored the model
    assert incomplete_entries(L) == [inc]
    assert sorted(os.listdir(L / inc)) == sorted(inputs + ["deltas.safetensors", "entry.json"])
    assert [e.id for e in entries(L)] == [e1.id] and [e.id for e in active_chain(L)] == [e1.id]
    r = verify(L, replay=True, load_base=lambda: copy.deepcopy(base))
    assert r.ok and r.incomplete == [inc] and r.checked == 1
    with pytest.raises(UnknownEntryError, match="incomplete"):
        show(L, inc)
    with pytest.raises(UnknownEntryError, match="incomplete"):
        show(L, "2")

    e2 = add(L, model, 2, fp)  # the rerun completes in the same directory
    assert e2.seq == 2 and e2.dirname == inc
    assert [e.id for e in active_chain(L)] == [e1.id, e2.id]
    assert incomplete_entries(L) == []
    r = verify(L, replay=True, load_base=lambda: copy.deepcopy(base))
    assert r.ok and r.checked == 2, r.message()


CHILD = textwrap.dedent("""
    import copy, os, random, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from test_ledger_support import add, tiny_model
    from pipeline.ledger import commit, entries, materialize
    from pipeline.models.loading import model_fingerprint

    ledger, target, pause_seq, marker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    real = commit._write_state

    def slow_commit(path, manifest):  # widen the window between the deltas and the commit
        if manifest["seq"] == pause_seq:
            open(marker, "w").write(str(manifest["seq"]))
            time.sleep(60)
        time.sleep(random.uniform(0, 0.02))
        return real(path, manifest)

    commit._write_state = slow_commit
    base = tiny_model()
    fp = model_fingerprint(base)
    model = materialize(ledger, None, base) if os.path.isdir(ledger) else copy.deepcopy(base)
    while True:
        n = len(entries(ledger)) + 1 if os.path.isdir(ledger) else 1
        if n > target:
            break
        add(ledger, model, n, fp)
    print("done", flush=True)
""")


def _spawn(script: Path, L: Path, target: int, pause: int, marker: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, str(script), str(L), str(target), str(pause), str(marker)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(cond, proc: subprocess.Popen, timeout: float = 90.0, poll=None) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the child")
        if poll:
            poll()
        time.sleep(0.01)


def _check_consistent(L: Path, base, at_least: int) -> list:
    chain = entries(L)
    assert len(chain) >= at_least
    assert [e.seq for e in chain] == list(range(1, len(chain) + 1))
    assert [e.id for e in active_chain(L)] == [e.id for e in chain]  # only edits: all active
    r = verify(L, replay=True, load_base=lambda: copy.deepcopy(base))
    assert r.ok, r.message()
    for name in r.incomplete:
        assert not (L / name / "state.json").exists()
    if chain:
        assert model_fingerprint(materialize(L, None, base)) == chain[-1].fingerprints["after"]["model"]
    return chain


def test_kill_9_during_append_loop(tmp_path):
    base = tiny_model()
    L = tmp_path / "ledger"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    marker = tmp_path / "marker"
    rng = random.Random(0)

    # round 1: killed exactly between the deltas and the commit of entry 3
    p = _spawn(script, L, 10, 3, marker)
    _wait(marker.exists, p)
    p.send_signal(signal.SIGKILL)
    p.wait()
    chain = _check_consistent(L, base, 2)
    assert len(chain) == 2
    (interrupted,) = incomplete_entries(L)
    assert interrupted.startswith("0003-")
    assert sorted(os.listdir(L / interrupted)) == ["batch.yaml", "deltas.safetensors", "entry.json",
                                                   "requests.parquet"]

    # rounds 2, 3: killed at a random moment while readers poll the ledger without the lock
    for _ in range(2):
        start = len(entries(L))
        p = _spawn(script, L, 100, 0, marker)
        seen = [start]

        def reader():
            chain = entries(L)  # must never see a half-written entry
            assert [e.seq for e in chain] == list(range(1, len(chain) + 1))
            seen.append(len(chain))

        _wait(lambda: seen[-1] >= start + 3, p, poll=reader)
        time.sleep(rng.uniform(0, 0.05))
        p.send_signal(signal.SIGKILL)
        p.wait()
        _check_consistent(L, base, max(seen))

    # rerun: completes, and the retry of entry 3 committed into the interrupted directory
    final = len(entries(L)) + 2
    p = _spawn(script, L, final, 0, marker)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "done" in out, err[-2000:]
    chain = _check_consistent(L, base, final)
    assert len(chain) == final
    assert chain[2].dirname == interrupted and incomplete_entries(L) == []
