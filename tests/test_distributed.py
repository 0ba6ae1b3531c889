"""Two processes under a real ``torchrun`` (gloo, one thread each) give the single process's results.

* the DVC covariance stage with ``distributed.processes: 2``: the same cache ids, the same statistic
  to float64 rounding, written once (rank 0);
* the DVC evaluate stage with two processes: the same metrics.json numbers and eval.parquet rows, bit
  for bit (scoring, generation and perplexity batches are shared out and gathered in order);
* ``torchrun -m pipeline evaluate`` (the README's command) on CounterFact and zsRE requests: the
  same numbers as ``editledger evaluate`` in one process;
* a rank killed mid-pass fails ``torchrun -m pipeline covariance`` with a message naming it, and
  nothing is written.

The project is the tiny one of the pipeline tests, its stages run in-process; each ``torchrun``
costs mostly its processes' start-up (imports).
"""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest
import torch
import yaml

from conftest import CORPUS_TEXT, TRAIN_TEXT
from pipeline import distributed
from pipeline_support import BIN, RECORDS, cli, env, make_project, requests_file

torch.set_num_threads(1)
ZSRE = [{"subject": "Rome", "src": "Where is Rome?", "alt": "Sweden", "answers": ["Italy"],
         "rephrase": "Rome is in which country?", "loc": "nq question: capital of France", "loc_ans": "Paris"}]


def _params(repo, **changes) -> None:
    p = repo / "params.yaml"
    cfg = yaml.safe_load(p.read_text())
    for section, values in changes.items():
        cfg[section] = {**cfg.get(section, {}), **values} if isinstance(values, dict) else values
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The tiny project with one applied and evaluated batch (one process), a covariance corpus
    saved as a ``datasets`` directory, and small evaluation batches, so that every part has several
    batches to share out."""
    import datasets

    tmp = tmp_path_factory.mktemp("dist")
    repo = make_project(tmp)
    lines = [ln for ln in (CORPUS_TEXT + TRAIN_TEXT).splitlines() if ln.strip()] * 3
    datasets.Dataset.from_dict({"body": lines}).save_to_disk(str(tmp / "corpus"))
    hp = yaml.safe_load((repo / "hparams-tiny.yaml").read_text())
    hp["defaults"]["cov_batch_tokens"] = 64  # two windows of 32 a batch: a dozen batches
    (repo / "hparams-tiny.yaml").write_text(yaml.safe_dump(hp))
    _params(repo, corpus={"path": str(tmp / "corpus"), "text_column": "body"},
            evaluation={"generation": {"prompts_per_record": 2, "max_new_tokens": 6, "top_k": 5, "batch_size": 2},
                        "retention": {"sample": 100, "full_every": 10, "generation": True},
                        "perplexity": {"max_length": 256}, "seed": 0})
    cli(repo, "stage", "model")
    cli(repo, "stage", "data")
    for layer in ("1", "2"):
        cli(repo, "stage", "covariance", "--role", "mlp_out", "--layer", layer, "--no-progress")
    cli(repo, "add", "--requests", str(requests_file(repo, "b1", RECORDS[:4])))
    batch = next(p for p in (repo / "ledger").iterdir() if p.is_dir())
    for stage in ("keys-values", "apply", "evaluate"):
        cli(repo, "stage", stage, "--batch", str(batch))
    return {"repo": repo, "tmp": tmp, "batch": batch}


def _entries(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{p.stem}": load_file(p)["cov"] for p in sorted(folder.glob("*/*.safetensors"))}


def test_two_ranks_covariance_stage_equals_one_process(project, tmp_path):
    repo = project["repo"]
    one = _entries(repo / "data" / "covariance")
    assert len(one) == 2
    _params(repo, distributed={"processes": 2}, cache_dir=str(tmp_path / "cache2"))
    try:
        res = cli(repo, "stage", "covariance", "--role", "mlp_out", "--layer", "1", "--no-progress")
    finally:
        _params(repo, distributed={"processes": 1}, cache_dir=str(project["tmp"] / "covcache"))
    two = _entries(tmp_path / "cache2")
    assert sorted(two) == sorted(one)  # the same cache ids: the key does not name the processes
    assert sorted(p.name for p in (tmp_path / "cache2").rglob("*")) == sorted(
        ["mlp_out-1", "mlp_out-2", *(k.split("/")[1] + ".safetensors" for k in one)])  # once, no temp files
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-12, atol=1e-15)
    assert res.output.strip().endswith(next(k for k in one if k.startswith("mlp_out-1")).split("/")[1])


def _sealed_numbers(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("timings", "digest")}


def test_two_ranks_evaluate_stage_equals_one_process(project, tmp_path, monkeypatch):
    repo, batch = project["repo"], project["batch"]
    one_doc = json.loads((batch / "metrics.json").read_text())
    one_rows = pd.read_parquet(batch / "eval.parquet")
    assert one_doc["post"]["n_generations"] == 4 and one_doc["perplexity"]["n_texts"] >= 1
    monkeypatch.setenv("EDITLEDGER_EVAL_CACHE", str(tmp_path / "eval.sqlite3"))  # computed, not read back
    _params(repo, distributed={"processes": 2})
    try:
        cli(repo, "stage", "evaluate", "--batch", str(batch))
    finally:
        _params(repo, distributed={"processes": 1})
    two_doc = json.loads((batch / "metrics.json").read_text())
    assert _sealed_numbers(two_doc) == _sealed_numbers(one_doc)
    pd.testing.assert_frame_equal(pd.read_parquet(batch / "eval.parquet"), one_rows)
    import sqlite3

    with sqlite3.connect(tmp_path / "eval.sqlite3") as db:  # rank 0 filled the cache
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] > 0


def _torchrun(args: list[str], cwd, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", "-m", "pipeline", *args],
                          cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=600)


def test_two_ranks_evaluate_command_equals_one_process(project, tmp_path, monkeypatch):
    repo, tmp = project["repo"], project["tmp"]
    reqs = requests_file(repo, "eval", RECORDS + ZSRE)
    shared = str(tmp / "shared" / "data")
    monkeypatch.setenv("EDITLEDGER_SHARED_DATA", shared)
    monkeypatch.setenv("EDITLEDGER_EVAL_CACHE", "off")
    args = ["evaluate", "--requests", str(reqs), "--params", str(repo / "params.yaml")]
    cli(repo, *args, "--out", str(tmp_path / "one"))
    p = _torchrun([*args, "--out", str(tmp_path / "two")], repo, EDITLEDGER_SHARED_DATA=shared,
                  EDITLEDGER_EVAL_CACHE="off")
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert set(one["metrics"]) == {"counterfact", "zsre"} and one["processes"] == 1 and two["processes"] == 2
    assert two["metrics"] == one["metrics"] and two["perplexity"] == one["perplexity"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "two" / "eval.parquet"),
                                  pd.read_parquet(tmp_path / "one" / "eval.parquet"))


def _covariance_params(repo, path, cache) -> None:
    cfg = yaml.safe_load((repo / "params.yaml").read_text())
    cfg["cache_dir"] = str(cache)
    cfg["model"]["path"] = str(repo / "data" / "model")
    cfg["edit"]["hparams"] = str(repo / "hparams-tiny.yaml")
    path.write_text(yaml.safe_dump(cfg))


def test_covariance_command_computes_what_the_stage_does(project, tmp_path):
    repo = project["repo"]
    _covariance_params(repo, tmp_path / "params.yaml", tmp_path / "cache")
    res = cli(tmp_path, "covariance", "--params", str(tmp_path / "params.yaml"), "--no-progress")
    stage = _entries(repo / "data" / "covariance")
    assert sorted(_entries(tmp_path / "cache")) == sorted(stage)
    assert all(k.split("/")[1] in res.output for k in stage) and "(processes: 1," in res.output


def test_a_dead_rank_fails_the_run_and_writes_nothing(project, tmp_path):
    repo = project["repo"]
    params = tmp_path / "params.yaml"
    _covariance_params(repo, params, tmp_path / "cache")
    p = _torchrun(["covariance", "--params", str(params), "--no-progress"], tmp_path,
                  **{distributed.CRASH_ENV: "covariance:batch", distributed.CRASH_RANK_ENV: "1"})
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "rank      : 1" in out and "SIGKILL" in out  # torchrun names the rank that died
    assert "rank 0 of 2" in out and "nothing was written" in out  # and the survivor says what it did
    assert not (tmp_path / "cache").exists()


def test_single_process_sharing_is_the_identity():
    assert distributed.size() == 1 and distributed.is_main() and not distributed.launched()
    assert list(distributed.mine(range(5))) == [0, 1, 2, 3, 4]
    assert distributed.map_shared(lambda x: x * x, [1, 2, 3]) == [1, 4, 9]
    assert distributed.broadcast("x", "test") == "x"
    assert distributed.init("cuda") == "cuda"  # no process group outside torchrun: the device as given


def test_a_failed_torchrun_fails_the_stage_with_its_exit_code(monkeypatch):
    from pipeline.stages.common import StageError, in_processes

    calls = []
    monkeypatch.setattr(distributed, "launch", lambda n, args: calls.append((n, list(args))) or 1)
    with pytest.raises(StageError, match=r"covariance mlp_out@1 in 2 processes \(torchrun\) failed with exit code 1.*"
                                         "nothing was written"):
        in_processes(2, ["stage", "covariance"], "covariance mlp_out@1")
    assert calls == [(2, ["stage", "covariance"])]


def test_evaluate_command_refuses_bad_input_before_any_work(tmp_path):
    reqs = tmp_path / "plain.json"
    reqs.write_text(json.dumps([{"subject": "Rome", "prompt": "{} is in", "target_new": "Sweden"}]))
    res = cli(tmp_path, "evaluate", "--requests", str(reqs), "--out", str(tmp_path / "out"), code=2)
    assert "has no evaluation protocol" in res.output and not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").touch()
    reqs.write_text(json.dumps(RECORDS[:1]))
    res = cli(tmp_path, "evaluate", "--requests", str(reqs), "--out", str(tmp_path / "full"), code=2)
    assert "exists and is not empty" in res.output
