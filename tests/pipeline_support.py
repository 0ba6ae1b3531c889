"""Helpers for the DVC pipeline tests (holds no tests): a tiny project laid out like the real one.

``make_project(tmp)`` builds, under ``tmp``::

    shared/data/   a tiny fake of the shared data mirror (4 CounterFact records, SHA256SUMS, ...)
    model-src/     conftest's tiny random Llama and its offline tokenizer, as a HF directory
    repo/          a git + DVC repository with this project's dvc.yaml, .dvcignore, .gitignore and
                   .dvc/config, a params.yaml pointing at model-src, and tiny hyper-parameters

so that ``../shared/data`` resolves from the repository exactly as it does for /work/main.  The
stages run through the ``editledger`` console script of this virtualenv (the package under test).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import CORPUS_TEXT, COUNTERFACT_RECORDS, make_model, tokenizer, counterfact_record

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
LAYERS = [1, 2]
TINY_HPARAMS = {
    "defaults": {"layers": LAYERS, "mom2_update_weight": 100.0, "v_num_grad_steps": 4, "v_lr": 0.5,
                 "loss_stop": 1e-6, "context_starters": ["The"], "context_length": 2, "cov_max_length": 32,
                 # as the bundled SmolLM2 setting: value optimisation in forked workers, here inside DVC stages
                 "v_workers": 2},
    "methods": {"memit": {}, "pmet": {"kl_factor": 1.0, "nll_weight_after_argmax": 0.1}},
}
# Ten CounterFact-style records: the four of conftest plus variants (other subjects and targets).
RECORDS = [*COUNTERFACT_RECORDS] + [
    counterfact_record(10 + i, subj, prompt, new, true)
    for i, (subj, prompt, new, true) in enumerate([
        ("Montesquieu", "The native language of {} is", "Italian", "French"),
        ("Rome", "{} is in", "Sweden", "Italy"),
        ("Madrid", "{} is located in", "Italy", "Spain"),
        ("Tokyo", "The city of {} is in", "Europe", "Japan"),
        ("Edwin", "{} plays the", "guitar", "piano"),
        ("Paris", "The capital of {} is", "Rome", "France"),
    ])
]


def env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: this venv first on PATH; one torch thread (the stages run tiny
    models, for which thread start-up and contention cost more than the compute)."""
    out = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    out.update(extra)
    return out


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=kw.pop("env", None) or env(), capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def git(repo: Path, *args: str) -> str:
    return run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], repo).stdout


def make_shared(root: Path) -> Path:
    data = root / "shared" / "data"
    files = {
        "counterfact/multi_counterfact_dev.json": json.dumps(RECORDS),
        "zsre/zsre_dev.json": json.dumps([{"subject": "Rome", "src": "Where is Rome?", "alt": "Sweden",
                                           "answers": ["Italy"], "rephrase": "Rome is in which country?",
                                           "loc": "nq question: capital of France", "loc_ans": "Paris"}]),
        "me_ppl/ME-PPL_50.json": json.dumps([{"Corpus": "test", "Text": "The capital of France is Paris."}]),
        "wikitext/wikitext2_raw_test.txt": CORPUS_TEXT,
    }
    lines = []
    for rel, text in files.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(text, encoding="utf-8")
        lines.append(f"{hashlib.sha256(text.encode()).hexdigest()}  {rel}")
    (data / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return data


def make_model_dir(root: Path) -> Path:
    out = root / "model-src"
    make_model("llama").save_pretrained(out, safe_serialization=True)
    tokenizer(True).save_pretrained(out)
    return out


def make_project(tmp: Path, method: str = "pmet") -> Path:
    """The tiny project (see the module docstring); returns the repository path, committed."""
    make_shared(tmp)
    model_dir = make_model_dir(tmp)
    repo = tmp / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".gitattributes"):
        shutil.copy(ROOT / name, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(ROOT / ".dvc" / ".gitignore", repo / ".dvc" / ".gitignore")
    (repo / "ledger").mkdir()
    (repo / "ledger" / ".gitkeep").touch()
    (repo / "hparams-tiny.yaml").write_text(yaml.safe_dump(TINY_HPARAMS))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["path"] = str(model_dir)
    params["edit"].update(method=method, hparams="hparams-tiny.yaml")
    params["covariance"] = {"layers": LAYERS, "roles": ["mlp_out"]}
    params["cache_dir"] = str(tmp / "covcache")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "project")
    return repo


def cli(repo: Path, *args: str, code: int = 0):
    """``editledger ARGS`` in-process, from ``repo``; asserts the exit code, returns the result."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    cwd = os.getcwd()
    os.chdir(repo)
    try:
        res = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(cwd)
    assert res.exit_code == code, (args, res.output, res.exception)
    return res


def requests_file(repo: Path, name: str, records: list[dict]) -> Path:
    """A requests file beside the project tree (writing it changes nothing in the tree)."""
    path = repo.parent / "requests" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def dvc(repo: Path, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return run([DVC, *args], repo, check=check, **kw)


def ran_stages(output: str) -> list[str]:
    """The stages a `dvc repro` output says it ran, in order."""
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]
