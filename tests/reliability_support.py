"""Helpers for the reliability tests and benchmarks/crash_harness.py (holds no tests).

The tiny project of :mod:`pipeline_support` with its root stages computed *in this process* (model,
data, covariances: no DVC, no subprocess, a few seconds), the ``editledger`` command line run in
this process, and a digest of a whole directory tree (to prove that a refused command changed
nothing).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from typer.testing import CliRunner

from pipeline.cli import app
from pipeline_support import RECORDS, make_project, requests_file  # noqa: F401  (re-exported)


def build_project(tmp: Path, method: str = "pmet") -> Path:
    """The tiny project (see pipeline_support) with data/model, data/*.parquet and covariances."""
    from pipeline.stages import covariance as covariance_stage
    from pipeline.stages import data as data_stage
    from pipeline.stages import model as model_stage
    from pipeline.stages.common import Project, configured_covariances

    repo = make_project(tmp, method)
    project = Project(repo)
    model_stage.run(project)
    data_stage.run(project, Path("../shared/data"))
    for role, layer in configured_covariances(project.params()):
        covariance_stage.run(project, role, layer, progress=False)
    return repo


def cli(repo: Path, *args: str, code: int | None = 0):
    """``editledger ARGS`` in this process, in project ``repo``; asserts the exit code (None: any)."""
    old = os.environ.get("EDITLEDGER_ROOT")
    os.environ["EDITLEDGER_ROOT"] = str(repo)
    try:
        res = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        if old is None:
            os.environ.pop("EDITLEDGER_ROOT")
        else:
            os.environ["EDITLEDGER_ROOT"] = old
    if code is not None and res.exit_code != code:
        raise AssertionError(f"editledger {' '.join(map(str, args))}: exit {res.exit_code}, expected {code}\n"
                             f"{res.output[-2000:]}\n{res.exception!r}")
    return res


def compute(repo: Path, batch_dir: Path, evaluate: bool = False) -> None:
    """The stages of one batch, in order (what `dvc repro -P` runs for it)."""
    stages = ["keys-values", "apply", "evaluate"] if (batch_dir / "requests.parquet").exists() else ["apply"]
    for stage in stages[: None if evaluate else 2]:
        cli(repo, "stage", stage, "--batch", batch_dir)


def add_batch(repo: Path, name: str, records: list[dict], evaluate: bool = False) -> Path:
    """``editledger add`` + its stages; returns the (committed) batch directory."""
    out = cli(repo, "add", "--requests", requests_file(repo, name, records)).stdout
    batch_dir = repo / out.split()[1].rstrip(":")
    compute(repo, batch_dir, evaluate)
    return batch_dir


def small_ledger(tmp: Path, evaluate: bool = False) -> Path:
    """Two edit batches and a revert to the first, all computed: the fixture most tests start from."""
    repo = build_project(tmp)
    add_batch(repo, "b1", RECORDS[0:2], evaluate)
    add_batch(repo, "b2", RECORDS[2:4], evaluate)
    rev = cli(repo, "revert", "1").stdout.split()[1]
    compute(repo, repo / rev)
    return repo


def tree_digest(root: Path) -> dict[str, str]:
    """Every file (by content) and directory under ``root``: equal digests = nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def project_with_one_batch(tmp: Path) -> Path:
    """The tiny project with one committed edit batch (records 0-1)."""
    repo = build_project(tmp)
    add_batch(repo, "b1", RECORDS[0:2])
    return repo
