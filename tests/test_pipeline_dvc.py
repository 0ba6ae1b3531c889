"""The DVC pipeline end to end on a tiny project (tiny random Llama, fake shared data, temp git repo).

One module-scoped ledger of five batches is built with the real commands (`editledger add`,
`dvc repro -P`), committed, and pushed to a local DVC remote; each test then works on a copy of
that repository (a sibling directory, so that ``../shared/data`` still resolves):

* everything verifies, replay included, and DVC reports the pipeline up to date;
* a fresh ``git clone`` + ``dvc pull`` + ``dvc repro -P`` runs nothing;
* changing batch 3 of 5 reruns exactly the stages of batches 3, 4, 5 — read from
  DVC's own output, not assumed;
* ``kill -9`` of a DVC-run apply stage just before its commit point leaves a ledger that verifies,
  with the batch not active; the next ``dvc repro -P`` completes it;
* revert and drop (exact and --fast) through the CLI give the documented active chains, and
  ``materialize`` writes bit-exact states;
* a flipped byte in any kind of ledger file (and in a delta's tensor data) fails ``verify``,
  which names the entry.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from pipeline.ledger import active_chain, entries, incomplete_entries, materialize, verify
from pipeline.models.loading import load_model, model_fingerprint
from pipeline.stages.summary import ledger_table
from pipeline.models.weights import apply_deltas
from pipeline.ledger import load_deltas
from pipeline_support import DVC, RECORDS, cli, dvc, env, git, make_project, ran_stages, requests_file

torch.set_num_threads(1)
N_BATCHES = 5
ROOT_STAGES = {"model", "data", "covariance@mlp_out-1", "covariance@mlp_out-2"}


def batch_stages(dirname: str) -> set[str]:
    return {f"ledger/{dirname}/dvc.yaml:{s}" for s in ("keys_values", "apply", "evaluate")}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Five committed batches of two CounterFact requests each, pushed to a local DVC remote."""
    tmp = tmp_path_factory.mktemp("pipeline")
    repo = make_project(tmp)
    for k in range(N_BATCHES):
        f = requests_file(repo, f"batch{k + 1}", RECORDS[2 * k: 2 * k + 2])
        cli(repo, "add", "--requests", str(f))
    out = dvc(repo, "repro", "-P").stdout
    dvc(repo, "remote", "add", "-d", "local", str(tmp / "remote"))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "five batches")
    dvc(repo, "push")
    return {"repo": repo, "repro": out, "dirs": sorted(p.name for p in (repo / "ledger").iterdir() if p.is_dir())}


def copy_of(project, name: str) -> Path:
    """A private copy of the fixture repository (DVC cache included) beside it."""
    dest = project["repo"].parent / name
    shutil.copytree(project["repo"], dest, symlinks=True)
    return dest


def ids(repo: Path) -> dict[str, str]:
    return {e.dirname: e.id for e in entries(repo / "ledger")}


def load_base(repo: Path):
    return lambda: load_model(repo / "data" / "model").model


# --------------------------------------------------------------------------------------- (a)

def test_five_batches_build_and_verify(project):
    repo, dirs = project["repo"], project["dirs"]
    assert len(dirs) == N_BATCHES and [d[:4] for d in dirs] == [f"{i:04d}" for i in range(1, 6)]
    expected = ROOT_STAGES | set().union(*(batch_stages(d) for d in dirs))
    ran = ran_stages(project["repro"])
    assert set(ran) == expected and len(ran) == len(expected)
    for d in dirs:
        files = set(os.listdir(repo / "ledger" / d))
        assert files >= {"batch.yaml", "requests.parquet", "dvc.yaml", "keys_values.parquet", "trace.parquet",
                         "entry.json", "deltas.safetensors", "state.json", "eval.parquet", "metrics.json"}
    chain = entries(repo / "ledger")
    assert [e.dirname for e in chain] == dirs and [e.dirname for e in active_chain(repo / "ledger")] == dirs
    assert [e.batch.parent for e in chain] == [None, *dirs[:-1]]
    assert len({e.base_fingerprint for e in chain}) == 1
    model_fp = json.loads((repo / "data" / "model.json").read_text())["fingerprint"]
    assert chain[0].base_fingerprint == model_fp
    assert len({json.dumps(e.covariance_ids, sort_keys=True) for e in chain}) == 1  # all keyed on the base model
    assert "up to date" in dvc(repo, "status").stdout
    out = cli(repo, "verify", "--replay").output
    assert "ok: 5 entries verified (hash chain and replay)" in out
    log = json.loads(cli(repo, "log", "--json").stdout)
    assert [r["status"] for r in log] == ["committed"] * 5 and all(r["active"] for r in log)
    assert all(r["post_efficacy"] is not None and r["n_requests"] == 2 for r in log)
    assert not (repo / "reports" / "summary.json").exists()  # the history is derived on demand, not a stage
    cli(repo, "report", "--out", str(repo.parent / "report-five"))
    summary = json.loads((repo.parent / "report-five" / "summary.json").read_text())
    assert summary["batches"] == 5 and summary["active_requests"] == 10
    assert "<table>" in (repo.parent / "report-five" / "index.html").read_text()


def test_evaluation_retention_collapse_and_history(project):
    """Every batch is evaluated on the unedited model, before, after, and on the earlier active edits;
    the report's row 0 is the unedited model; DVC sees each batch's metrics and the report's plots."""
    repo, dirs = copy_of(project, "history"), project["dirs"]
    cli(repo, "report")  # reports/latest/, where the root dvc.yaml's plots read the history
    ev = [json.loads((repo / "ledger" / d / "metrics.json").read_text()) for d in dirs]
    assert [e["retention"]["mode"] for e in ev] == ["none", "all", "all", "all", "all"]
    assert [e["retention"]["n_evaluated"] for e in ev] == [0, 2, 4, 6, 8]
    assert ev[4]["retention"]["batches"] == dirs[:4] and set(ev[4]["retention"]["metrics"]) == {"counterfact"}
    assert all(e["perplexity"]["base"] == ev[0]["perplexity"]["base"] for e in ev)  # one unedited model
    assert all(e["perplexity"]["post"] != e["perplexity"]["base"] for e in ev)
    assert all(e["post"]["fluency"] > 0 and "fluency" not in e["pre"] for e in ev)
    assert ev[0]["pre"]["efficacy"] == ev[0]["base"]["efficacy"]  # the first batch's parent is the base
    rows = pd.read_parquet(repo / "ledger" / dirs[4] / "eval.parquet")
    assert set(rows["phase"]) == {"base", "pre", "post", "retention"}
    ret = rows[rows["phase"] == "retention"]
    assert set(ret["batch"]) == set(dirs[:4]) and {"rank_new", "rank_true", "generation"} <= set(rows.columns)
    hist = pd.read_parquet(repo / "reports" / "latest" / "summary.parquet")
    assert hist["seq"].tolist() == list(range(6)) and hist["kind"][0] == "base"
    assert hist["n_active_requests"].tolist() == [0, 2, 4, 6, 8, 10]
    assert hist["ppl"][0] == ev[0]["perplexity"]["base"] and hist["ppl"][5] == ev[4]["perplexity"]["post"]
    assert hist["post_efficacy"][0] == pytest.approx(sum(e["base"]["efficacy"] for e in ev) / 5)
    assert hist["ret_efficacy"][5] == ev[4]["retention"]["metrics"]["counterfact"]["efficacy"]
    assert {"delta_norm_layer_1", "delta_norm_layer_2"} <= set(hist.columns)
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    assert all(f"ledger/{d}/metrics.json" in json.dumps(shown) for d in dirs)
    plots = json.loads(dvc(repo, "plots", "show", "--json", "--split").stdout)["data"]
    assert {"edit_success", "retention", "collapse_ppl", "fluency"} <= set(plots)
    assert "ME-PPL-50 perplexity" in json.dumps(plots["collapse_ppl"])


# --------------------------------------------------------------------------------------- (c)

def test_fresh_clone_and_pull_is_up_to_date(project):
    clone = project["repo"].parent / "clone"
    subprocess.run(["git", "clone", "-q", str(project["repo"]), str(clone)], check=True, env=env())
    assert not (clone / "data" / "model").exists()
    dvc(clone, "pull")
    out = dvc(clone, "repro", "-P").stdout
    assert ran_stages(out) == [] and "Data and pipelines are up to date." in out
    assert "up to date" in dvc(clone, "status").stdout
    assert "ok: 5 entries verified (hash chain and replay)" in cli(clone, "verify", "--replay").stdout


# --------------------------------------------------------------------------------------- (b)

def test_changing_batch_3_reruns_exactly_batches_3_to_5(project):
    repo = copy_of(project, "changed")
    dirs = project["dirs"]
    before = ids(repo)
    batch_yaml = repo / "ledger" / dirs[2] / "batch.yaml"
    doc = yaml.safe_load(batch_yaml.read_text())
    assert doc["method"] == "pmet"
    batch_yaml.write_text(batch_yaml.read_text().replace("method: pmet", "method: memit"))
    # DVC sees the change in batch 3's inputs only ...
    status = dvc(repo, "status").stdout
    changed = {line[:-1] for line in status.splitlines() if line.endswith(":") and not line[:1].isspace()}
    assert changed == {f"ledger/{dirs[2]}/dvc.yaml:keys_values", f"ledger/{dirs[2]}/dvc.yaml:apply"}
    assert list(ledger_table(repo / "ledger")["status"]) == ["committed", "committed", "changed", "stale", "stale"]
    r = verify(repo / "ledger")
    assert not r.ok and r.first_bad.dirname == dirs[2] and "inputs changed" in r.first_bad.reason
    # ... and the repro reruns exactly batches 3, 4 and 5, nothing else
    ran = ran_stages(dvc(repo, "repro", "-P").stdout)
    assert set(ran) == batch_stages(dirs[2]) | batch_stages(dirs[3]) | batch_stages(dirs[4])
    assert len(ran) == 9
    after = ids(repo)
    assert [after[d] == before[d] for d in dirs] == [True, True, False, False, False]
    assert entries(repo / "ledger")[2].method == "memit"
    assert "ok: 5 entries verified (hash chain and replay)" in cli(repo, "verify", "--replay").stdout
    assert ran_stages(dvc(repo, "repro", "-P").stdout) == []
    # the change of method shows at a glance against the committed history, batch by batch
    diff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)
    assert f"ledger/{dirs[2]}/metrics.json" in diff and f"ledger/{dirs[0]}/metrics.json" not in diff
    assert "perplexity.post" in diff[f"ledger/{dirs[2]}/metrics.json"]
    assert "perplexity.base" not in diff[f"ledger/{dirs[2]}/metrics.json"]  # the unedited model did not change


# --------------------------------------------------------------------------------------- (d)

HOOK = """
import os, sys
if os.environ.get("EDITLEDGER_PAUSE_MARKER") and sys.argv[1:3] == ["stage", "apply"]:
    import time
    from pipeline.ledger import commit
    real = commit._write_state

    def paused(path, manifest):  # everything but state.json is written: wait to be killed
        open(os.environ["EDITLEDGER_PAUSE_MARKER"], "w").write(str(path))
        time.sleep(300)
        return real(path, manifest)

    commit._write_state = paused
"""


def test_kill_9_during_apply_leaves_a_ledger_that_verifies(project):
    repo = copy_of(project, "killed")
    f = requests_file(repo, "batch6", RECORDS[4:6])
    cli(repo, "add", "--requests", str(f))
    (new,) = incomplete_entries(repo / "ledger")
    hook = repo.parent / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    marker = repo.parent / "paused"
    path = f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"  # the hook, and still the package under test
    proc = subprocess.Popen([DVC, "repro", "-P"], cwd=repo, env=env(PYTHONPATH=path, EDITLEDGER_PAUSE_MARKER=str(marker)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the apply stage never reached its commit point"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    d = repo / "ledger" / new
    assert (d / "deltas.safetensors").exists() and (d / "entry.json").exists() and not (d / "state.json").exists()
    L = repo / "ledger"
    r = verify(L, replay=True, load_base=load_base(repo))
    assert r.ok and r.checked == 5 and r.incomplete == [new], r.message()
    assert new not in {e.dirname for e in active_chain(L)}
    log = json.loads(cli(repo, "log", "--json").stdout)
    assert log[-1]["status"] == "interrupted" and log[-1]["active"] is None
    # the next repro (no hook) completes it: keys_values already ran, so apply and evaluate
    ran = ran_stages(dvc(repo, "repro", "-P").stdout)
    assert ran == [f"ledger/{new}/dvc.yaml:apply", f"ledger/{new}/dvc.yaml:evaluate"]
    assert [e.dirname for e in active_chain(L)][-1] == new
    assert "ok: 6 entries verified (hash chain and replay)" in cli(repo, "verify", "--replay").stdout


# --------------------------------------------------------------------------------------- (e)

def _compute(repo: Path, paths: list[str]) -> None:
    """Run the stages of new batch directories in-process (what `dvc repro -P` would run)."""
    for p in paths:
        d = repo / "ledger" / p
        if "keys_values" in yaml.safe_load((d / "dvc.yaml").read_text())["stages"]:
            cli(repo, "stage", "keys-values", "--batch", str(d))
        cli(repo, "stage", "apply", "--batch", str(d))


def _added(res) -> list[str]:
    return [line.split()[1].split("/")[1] for line in res.output.splitlines() if line.startswith("added ledger/")]


def _materialized(repo: Path, ref: str, out: Path):
    cli(repo, "materialize", ref, str(out))
    return load_model(out).model


def test_revert_and_drop_through_the_cli(project, tmp_path):
    repo = copy_of(project, "revert-drop")
    L = repo / "ledger"
    d = project["dirs"]
    chain = {e.dirname: e for e in entries(L)}
    active = lambda: [e.dirname for e in active_chain(L)]  # noqa: E731

    # exact drop of batch 3: a drop entry, then batches 4 and 5 recomputed on the state after 2
    res = cli(repo, "drop", "3")
    new = _added(res)
    assert len(new) == 3 and "exact, re-applying 2 later batch(es)" in res.output
    cli(repo, "revert", "2", code=2)  # refused until the drop is computed
    _compute(repo, new)
    now = {e.dirname: e for e in entries(L)}
    drop, r4, r5 = (now[n] for n in new)
    assert drop.kind == "drop" and drop.mode == "exact" and not drop.approximate
    assert (r4.batch.reapplies, r5.batch.reapplies) == (d[3], d[4]) and r4.requests == chain[d[3]].requests
    assert active() == [d[0], d[1], new[1], new[2]]
    assert drop.fingerprints["after"]["model"] == chain[d[1]].fingerprints["after"]["model"]  # = state after 2
    m = _materialized(repo, new[2], tmp_path / "exact")
    assert model_fingerprint(m) == r5.fingerprints["after"]["model"]

    # fast drop of the re-applied batch 4: subtract its delta, flagged approximate
    res = cli(repo, "drop", new[1], "--fast")
    (fast,) = _added(res)
    _compute(repo, [fast])
    f = {e.dirname: e for e in entries(L)}[fast]
    assert f.approximate and active() == [d[0], d[1], new[2]]
    expected = load_base(repo)()
    materialize(L, new[2], expected, inplace=True)
    apply_deltas(expected, load_deltas(r4), -1)
    assert model_fingerprint(expected) == f.fingerprints["after"]["model"]
    assert model_fingerprint(_materialized(repo, fast, tmp_path / "fast")) == f.fingerprints["after"]["model"]

    # revert to batch 2: exactly the state after it (not approximate any more)
    (rev,) = _added(cli(repo, "revert", "2"))
    _compute(repo, [rev])
    r = {e.dirname: e for e in entries(L)}[rev]
    assert active() == [d[0], d[1]] and not r.approximate
    assert r.fingerprints["after"] == chain[d[1]].fingerprints["after"]
    assert model_fingerprint(_materialized(repo, rev, tmp_path / "rev")) == chain[d[1]].fingerprints["after"]["model"]

    # errors are one line and exit code 2
    assert "already reverted or dropped" in cli(repo, "revert", "4", code=2).output
    assert "not active" in cli(repo, "drop", "3", code=2).output
    assert "no committed entry" in cli(repo, "show", "99", code=2).output
    out = cli(repo, "verify", "--replay").output
    assert "ok: 10 entries verified" in out and "approximate" not in out
    dd = json.loads(cli(repo, "diff", "5", rev, "--json").output)
    assert len(dd["requests_removed"]) == 6 and dd["requests_added"] == []  # batches 3, 4, 5


# --------------------------------------------------------------------------------------- (f)

FILES = ["batch.yaml", "requests.parquet", "dvc.yaml", "keys_values.parquet", "trace.parquet", "entry.json",
         "deltas.safetensors", "state.json", "eval.parquet", "metrics.json"]


def _rewrite(path: Path, data: bytes) -> None:
    path.unlink()  # never write through a (possibly hard-linked) DVC cache file
    path.write_bytes(data)


def test_verify_names_the_entry_of_any_changed_byte(project):
    repo = copy_of(project, "tampered")
    L = repo / "ledger"
    assert verify(L).ok
    d = L / project["dirs"][2]
    for name in FILES:
        path = d / name
        data = path.read_bytes()
        for pos in (0, len(data) // 2, len(data) - 2):
            _rewrite(path, data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:])
            r = verify(L)
            assert not r.ok and r.first_bad.dirname == d.name, (name, pos, r.first_bad)
        _rewrite(path, data)
    # a flipped bit inside one delta tensor's data (not the header)
    path = d / "deltas.safetensors"
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    _rewrite(path, data[:header + 5] + bytes([data[header + 5] ^ 0x10]) + data[header + 6:])
    res = cli(repo, "verify", code=1)
    assert f"FAILED at {d.name}" in res.output and "deltas.safetensors" in res.output
    _rewrite(path, data)
    assert verify(L, replay=True, load_base=load_base(repo)).ok
