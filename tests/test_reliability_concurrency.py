"""Two writers at once, with real processes: one proceeds, the other is refused naming the holder;
readers (log, show, verify) work while a write is in progress and never see it half-done.

The first writer is held inside its critical section — lock taken, new batch directory complete
under ``ledger/.tmp-*`` but not yet renamed into place — by ``EDITLEDGER_PAUSE_AT`` (see
pipeline/ledger/faults.py), so the interleaving is certain rather than hoped for.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.ledger import read_batch, scan
from pipeline.ledger.faults import MARKER_ENV, PAUSE_ENV
from pipeline_support import BIN, RECORDS, env
from reliability_support import project_with_one_batch, cli, requests_file

EDITLEDGER = str(BIN / "editledger")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return project_with_one_batch(tmp_path_factory.mktemp("concurrency"))


def test_a_second_writer_is_refused_while_readers_work(project, tmp_path):
    repo, L = project, project / "ledger"
    marker = tmp_path / "paused"
    writer = subprocess.Popen([EDITLEDGER, "add", "--requests", str(requests_file(repo, "w1", RECORDS[2:4]))],
                              cwd=repo, env=env(**{PAUSE_ENV: "batch:before-rename", MARKER_ENV: str(marker)}),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert writer.poll() is None, writer.communicate()
            assert time.monotonic() < deadline, "the writer never reached its pause point"
            time.sleep(0.05)
        assert [p.name[:5] for p in L.iterdir() if p.name.startswith(".tmp-")] == [".tmp-"]  # mid-write
        # other writers are refused at once; readers do not need the lock and see only what is
        # complete (all started together: they really run while the writer holds the lock)
        commands = {"add": ["add", "--requests", requests_file(repo, "w2", RECORDS[4:6])], "revert": ["revert", "base"],
                    "log": ["log", "--json"], "show": ["show", "1"], "verify": ["verify"]}
        procs = {k: subprocess.Popen([EDITLEDGER, *map(str, args)], cwd=repo, env=env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for k, args in commands.items()}
        res = {k: (p.wait(timeout=300), *p.communicate()) for k, p in procs.items()}
        locked = f"error: the ledger is locked by process {writer.pid} "
        for k in ("add", "revert"):
            code, _, err = res[k]
            assert code == 2 and err.startswith(locked) and err.count("\n") == 1, res[k]
        assert res["log"][0] == 0 and [r["seq"] for r in json.loads(res["log"][1])] == [1], res["log"]
        assert res["show"][0] == 0 and json.loads(res["show"][1])["seq"] == 1, res["show"]
        assert res["verify"][0] == 0 and res["verify"][1].startswith("ok: 1 entries verified"), res["verify"]
        assert len(scan(L)) == 1
    finally:
        Path(f"{marker}.go").touch()
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0 and out.startswith("added ledger/0002-"), err
    out = cli(repo, "add", "--requests", requests_file(repo, "w2", RECORDS[4:6])).stdout  # now it is free
    assert out.startswith("added ledger/0003-")
    assert [d.seq for d in scan(L)] == [1, 2, 3] and not list(L.glob(".tmp-*"))
    assert (L / ".lock").read_text() == ""  # released: no stale pid


def test_racing_writers_never_fork_the_ledger(project):
    repo = project.parent / "race"
    shutil.copytree(project, repo, symlinks=True)
    L = repo / "ledger"
    n0 = len(scan(L))
    files = [requests_file(repo, f"race{i}", RECORDS[2 * i + 2: 2 * i + 4]) for i in range(3)]
    procs = [subprocess.Popen([EDITLEDGER, "add", "--requests", str(f)], cwd=repo, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in files]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    ok = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert all(code == 2 and "the ledger is locked by process" in err for code, _, err in refused), refused
    dirs = scan(L)  # dense sequence numbers, one directory per successful writer
    assert len(ok) >= 1 and len(dirs) == n0 + len(ok) and [d.seq for d in dirs] == list(range(1, len(dirs) + 1))
    assert [read_batch(d.path).parent for d in dirs] == [None] + [d.name for d in dirs[:-1]]  # a chain, no fork
