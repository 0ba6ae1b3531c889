"""Tampering: a flipped byte anywhere in a small real ledger, or in a covariance cache entry, is
detected — by ``editledger verify`` naming the entry, or by the stage that reads the file — and
never silently used.

The ledger is built by the real stages and recorded by DVC (see the fixture): two evaluated edit
batches and a revert.  Every file under ``ledger/``
is enumerated and changed at several positions (first and last bytes, thirds, the middle) with
several bit masks.  The files outside the hash chain are named and checked separately:

* ``dvc.lock`` (DVC's record of the hashes of a stage's inputs and outputs): DVC reads it, and a
  changed byte makes ``dvc status`` report the stage as changed (so ``dvc repro`` recomputes it)
  or fail — DVC never trusts it for content, the ledger's own hashes stay authoritative;
* ``.gitignore`` (written by DVC so that git ignores the outputs), ``.gitkeep`` (empty) and
  ``.lock`` (empty unless a writer holds it): nothing reads their content, so a change cannot alter
  what the ledger means; ``verify --replay`` still passes.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.editing.covariance import CovarianceCacheError
from pipeline.editing.hparams import HParams
from pipeline.ledger import read_batch, scan, verify
from pipeline.models.loading import load_model
from pipeline.stages import covariance as covariance_stage
from pipeline.stages.covariance import cached_covariances
from pipeline.stages.common import Project, base_model, configured_covariances
from pipeline_support import RECORDS, dvc
from reliability_support import cli, requests_file, small_ledger

torch.set_num_threads(1)
OUTSIDE_CHAIN = {"dvc.lock", ".gitignore", ".gitkeep", ".lock"}
MASKS = (0x01, 0x20, 0x80)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Every stage run by the same code DVC runs, in this process (a `dvc repro` would start a
    process per stage: minutes), then `dvc commit` records them in the dvc.lock files as a repro
    would; `dvc status` must then find the pipeline up to date."""
    repo = small_ledger(tmp_path_factory.mktemp("tamper"), evaluate=True)
    dvc(repo, "commit", "-f")
    assert "up to date" in dvc(repo, "status").stdout
    assert verify(repo / "ledger").ok and len(scan(repo / "ledger")) == 3
    return repo


def copy_of(repo: Path, name: str) -> Path:
    dest = repo.parent / name
    shutil.copytree(repo, dest, symlinks=True)
    return dest


def flips(data: bytes) -> list[tuple[int, bytes]]:
    """(position, changed bytes) at the first/last bytes, the thirds and the middle, masks rotating."""
    n = len(data)
    positions = sorted({0, 1, n // 3, n // 2, 2 * n // 3, n - 2, n - 1} & set(range(n)))
    return [(pos, data[:pos] + bytes([data[pos] ^ MASKS[i % len(MASKS)]]) + data[pos + 1:])
            for i, pos in enumerate(positions)]


def rewrite(path: Path, data: bytes) -> None:
    path.unlink()  # never write through a DVC cache link
    path.write_bytes(data)


def test_every_flipped_byte_of_every_ledger_file_is_named_by_verify(project):
    repo = copy_of(project, "flip-ledger")
    L = repo / "ledger"
    tried, outside = Counter(), set()
    for path in sorted(p for p in L.rglob("*") if p.is_file()):
        rel = path.relative_to(L)
        if path.name in OUTSIDE_CHAIN:
            outside.add(path.name)
            continue
        data = path.read_bytes()
        for pos, changed in flips(data):
            rewrite(path, changed)
            r = verify(L)
            assert not r.ok and r.first_bad.dirname == rel.parts[0], (str(rel), pos, r.message())
            tried[path.name] += 1
        rewrite(path, data)
    kinds = {"batch.yaml", "requests.parquet", "dvc.yaml", "keys_values.parquet", "trace.parquet", "entry.json",
             "keys.safetensors", "deltas.safetensors", "state.json", "eval.parquet", "metrics.json"}
    assert set(tried) == kinds and {"dvc.lock", ".gitignore", ".gitkeep"} <= outside <= OUTSIDE_CHAIN
    print(f"\nledger byte flips detected: {sum(tried.values())} in {len(kinds)} kinds of file: {dict(tried)}")
    assert verify(L, replay=True, load_base=lambda: load_model(repo / "data" / "model").model).ok


def test_files_outside_the_hash_chain(project):
    repo = copy_of(project, "flip-outside")
    L = repo / "ledger"
    noticed = 0
    for lock in sorted(L.glob("*/dvc.lock")):
        data = lock.read_bytes()
        # a digit of a recorded hash, a third and two thirds into the file (a changed `size:` is not
        # noticed by `dvc status`: DVC compares the hashes, and the ledger never reads dvc.lock)
        digests = [m.start() + 6 for m in re.finditer(rb"md5: [0-9a-f]{32}", data)]
        for pos in (next(x for x in digests if x >= len(data) // 3), next(x for x in digests if x >= 2 * len(data) // 3)):
            rewrite(lock, data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:])
            p = dvc(repo, "status", check=False)
            assert p.returncode != 0 or "up to date" not in p.stdout, (lock, pos, p.stdout)
            noticed += 1
        rewrite(lock, data)
    for ignore in L.glob("*/.gitignore"):  # read by git only: the ledger's meaning cannot change
        data = ignore.read_bytes()
        rewrite(ignore, data[:1] + bytes([data[1] ^ 0x01]) + data[2:])
    assert noticed == 6
    assert verify(L, replay=True, load_base=lambda: load_model(repo / "data" / "model").model).ok


def test_a_flipped_covariance_cache_entry_is_refused_by_the_stages_that_read_it(project):
    repo = copy_of(project, "flip-covariance")
    proj = Project(repo)
    cfg = proj.params()
    targets = configured_covariances(cfg)
    hp = HParams.from_dict(read_batch(scan(repo / "ledger")[0].path).hparams)
    lm = base_model(proj)
    pipeline_entries = sorted((repo / "data" / "covariance").rglob("*.safetensors"))
    user_entries = sorted(Path(cfg["cache_dir"]).rglob("*.safetensors"))
    assert len(pipeline_entries) == len(user_entries) == len(targets) == 2
    detected = 0
    for path in pipeline_entries + user_entries:  # (the user-level cache is shared with the fixture: restore it)
        data = path.read_bytes()
        mid = (8 + int.from_bytes(data[:8], "little")) // 2  # inside the JSON header
        try:
            for pos, changed in flips(data) + [(mid, data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1:])]:
                rewrite(path, changed)
                with pytest.raises(CovarianceCacheError, match="unreadable|different key|fails its content hash"):
                    if path in pipeline_entries:  # read by the apply stage of every batch
                        cached_covariances(proj, lm, targets, hp)
                    else:  # read by the covariance stage (the user-level cache it fills and copies from)
                        covariance_stage.run(proj, *targets[0], progress=False)
                detected += 1
        finally:
            rewrite(path, data)
    print(f"\ncovariance byte flips detected: {detected}")
    # and end to end: the apply stage of a new batch stops with one line, exit code 2
    out = cli(repo, "add", "--requests", requests_file(repo, "b3", RECORDS[4:6])).stdout
    d = repo / out.split()[1].rstrip(":")
    cli(repo, "stage", "keys-values", "--batch", d)
    path = pipeline_entries[-1]
    data = path.read_bytes()
    rewrite(path, data[:-1] + bytes([data[-1] ^ 0x01]))
    res = cli(repo, "stage", "apply", "--batch", d, code=2)
    assert "fails its content hash (corrupted or tampered)" in res.stderr and not (d / "state.json").exists()


def test_a_changed_base_model_file_is_refused(project):
    """data/model (weights, config, tokenizer) is pinned by data/model.json: fingerprint + file sha256s."""
    repo = copy_of(project, "flip-model")
    files = sorted(p for p in (repo / "data" / "model").iterdir() if p.is_file())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        rewrite(path, data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x01]) + data[len(data) // 2 + 1:])
        res = cli(repo, "verify", "--replay", code=2)
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
        assert path.name in res.stderr or "does not match the fingerprint" in res.stderr, res.stderr
        rewrite(path, data)
    assert cli(repo, "verify", "--replay").stdout.startswith("ok: 3 entries verified")
