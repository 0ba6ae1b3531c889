"""Two clones, one history, end to end: real git clones of a bare origin, a real local DVC remote,
the tiny project, every stage run by `dvc repro -P`.

A and B clone the project; each adds one batch, computes it, commits and pushes (git + DVC); B
merges A.  The merge is conflict-free and `dvc pull` works; the ledger forks, so `verify` fails and
`add` refuses, both naming the two batches; `editledger rebase` re-appends B's batch after A's and
`dvc repro -P` computes exactly that batch; everything verifies (replay included) and A, after
pulling B's result, has an up-to-date pipeline and the same history.  `blame` and the log filters
on that history; two pending batches that edit one fact to different objects: `rebase` refuses,
naming both batches and the subject, and changes nothing; an automatic checkpoint computed by
DVC seals the history.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.ledger import entries
from pipeline_support import RECORDS, cli, dvc, env, git, make_project, ran_stages, requests_file, run

torch.set_num_threads(1)


def clone(origin: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(origin), str(dest)], check=True, env=env())
    return dest


def add_compute_push(repo: Path, name: str, records: list[dict], compute: bool = True) -> str:
    f = requests_file(repo, name, records)
    out = added(cli(repo, "add", "--requests", str(f)).output)
    if compute:
        dvc(repo, "repro", "-P")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", f"batch {name}")
    if compute:
        dvc(repo, "push")
    git(repo, "push", "-q", "origin", "HEAD")
    return out


def added(output: str) -> str:
    """The batch directory `editledger add` reports ("added ledger/0002-…: 2 requests, …")."""
    return output.split()[1].split("/")[1].rstrip(":")


def pull(repo: Path) -> subprocess.CompletedProcess:
    return run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "pull", "-q", "--no-rebase", "--no-edit"], repo,
               check=False)


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team")
    repo = make_project(tmp)
    dvc(repo, "remote", "add", "-d", "local", str(tmp / "dvc-remote"))
    dvc(repo, "repro", "-P")  # root stages only: model, data, covariances
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "root stages")
    dvc(repo, "push")
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(tmp / "origin.git")], check=True, env=env())
    a, b = clone(tmp / "origin.git", tmp / "alice"), clone(tmp / "origin.git", tmp / "bob")
    for c in (a, b):
        dvc(c, "pull")
    return {"a": a, "b": b, "a_dir": add_compute_push(a, "alice1", RECORDS[0:2])}


def test_two_clones_merge_rebase_and_agree(team):
    a, b = team["a"], team["b"]
    b_dir = add_compute_push_local(b)
    p = pull(b)  # B merges A
    assert p.returncode == 0, p.stdout + p.stderr
    assert "CONFLICT" not in p.stdout + p.stderr and git(b, "status", "--porcelain") == ""
    dvc(b, "pull")  # A's outputs, from the DVC remote
    # the chain forks: verify and writers refuse it, naming both batches and the way out
    res = cli(b, "verify", code=1)
    assert "forks at batch 0001" in res.output and team["a_dir"] in res.output and b_dir in res.output
    assert "editledger rebase" in res.output
    f = requests_file(b, "more", RECORDS[6:7])
    res = cli(b, "add", "--requests", str(f), code=2)
    assert "forks at batch 0001" in res.output and git(b, "status", "--porcelain") == ""
    # rebase: keep upstream (A), re-append B's batch after it; DVC computes exactly that batch
    res = cli(b, "rebase")
    new = res.output.split("→ ledger/")[1].split()[0]
    assert f"{b_dir} → ledger/{new}" in res.output and new.startswith("0002-")
    ran = ran_stages(dvc(b, "repro", "-P").stdout)
    assert set(ran) == {f"ledger/{new}/dvc.yaml:{s}" for s in ("keys_values", "apply", "evaluate")}, ran
    out = cli(b, "verify", "--replay").output
    assert "ok: 2 entries verified (hash chain and replay); 1 superseded batch(es)" in out
    chain = entries(b / "ledger")
    assert [e.dirname for e in chain] == [team["a_dir"], new]
    log = {r["dir"]: r for r in json.loads(cli(b, "log", "--json").output)}
    assert log[b_dir]["status"] == "superseded" and log[b_dir]["active"] is False
    assert log[new]["status"] == "committed" and log[new]["active"] is True
    git(b, "add", "-A")
    git(b, "commit", "-qm", "rebase")
    dvc(b, "push")
    git(b, "push", "-q", "origin", "HEAD")
    # A pulls B's result: a fast-forward, and nothing to compute
    assert pull(a).returncode == 0
    dvc(a, "pull")
    assert ran_stages(dvc(a, "repro", "-P").stdout) == []
    assert [e.id for e in entries(a / "ledger")] == [e.id for e in chain]
    assert "ok: 2 entries verified (hash chain and replay)" in cli(a, "verify", "--replay").output


def add_compute_push_local(b: Path) -> str:
    """B's own batch, committed and pushed to the DVC remote (its git push comes after the merge)."""
    f = requests_file(b, "bob1", RECORDS[2:4])
    name = added(cli(b, "add", "--requests", str(f)).output)
    dvc(b, "repro", "-P")
    git(b, "add", "-A")
    git(b, "commit", "-qm", "batch bob1")
    dvc(b, "push")
    return name


def test_blame_and_log_filters_after_the_rebase(team):
    """B's fact now has two entries: the superseded original and its active re-appended copy;
    blame lists both and what the active and the base model answer for it."""
    b = team["b"]
    rec = RECORDS[2]["requested_rewrite"]
    subject = rec["subject"]
    report = json.loads(cli(b, "blame", subject.upper(), "--json").output)  # subjects match case-insensitively
    rows = report["entries"]
    assert [r["status"] for r in rows] == ["committed", "superseded"] and [r["active"] for r in rows] == [True, False]
    assert rows[0]["seq"] == 2 and rows[1]["seq"] == 1 and rows[0]["method"] == "pmet"
    assert all(r["target_new"] == rec["target_new"]["str"] and r["relation_id"] == rec["relation_id"] for r in rows)
    assert rows[0]["created_at"] and "rebase" in rows[1]["removed_by"]
    (prompt,) = report["answers"]
    assert prompt == rec["prompt"].replace("{}", subject)
    active, base = report["answers"][prompt]["active"], report["answers"][prompt]["base"]
    assert set(active["probs"]) == {rec["target_new"]["str"], rec["target_true"]["str"]}
    assert active["answer"] in active["probs"] and all(0 < p < 1 for p in active["probs"].values())
    assert active["probs"] != base["probs"]  # the edit changed what the model says
    text = cli(b, "blame", subject).output
    assert "now, active model" in text and "now, base model" in text and "superseded" in text
    assert "no batch's requests name" in cli(b, "blame", subject, "--relation", "P999", code=2).output
    log = lambda *a: {r["dir"] for r in json.loads(cli(b, "log", "--json", *a).output)}  # noqa: E731
    assert log("--status", "superseded") == {rows[1]["dir"]}
    assert log("--subject", subject) == {rows[0]["dir"], rows[1]["dir"]}
    assert log("--method", "memit") == set() and log("--method", "pmet") == log()
    assert log("--since", "2000-01-01") == {team["a_dir"], rows[0]["dir"], rows[1]["dir"]}
    assert log("--until", "2000-01-01") == set()
    assert "is not a date" in cli(b, "log", "--since", "yesterday", code=2).output
    # the report links each batch to its requests
    cli(b, "report", "--out", str(b.parent / "report-b"))
    page = (b.parent / "report-b" / "index.html").read_text()
    assert f"href='#requests-{rows[0]['dir']}'" in page and f"id='requests-{rows[0]['dir']}'" in page
    assert subject in page.split(f"id='requests-{rows[0]['dir']}'")[1]


def test_a_fact_edited_to_two_objects_is_refused(team):
    a, b = team["a"], team["b"]
    rec = RECORDS[4]
    other = json.loads(json.dumps(rec))
    other["requested_rewrite"]["target_new"]["str"] = "Atlantis"
    a_dir = add_compute_push(a, "alice2", [rec], compute=False)
    f = requests_file(b, "bob2", [other])
    b_dir = added(cli(b, "add", "--requests", str(f)).output)
    git(b, "add", "-A")
    git(b, "commit", "-qm", "batch bob2")
    assert pull(b).returncode == 0
    head = git(b, "rev-parse", "HEAD")
    res = cli(b, "rebase", code=2)
    subject = rec["requested_rewrite"]["subject"]
    assert "fact conflict" in res.output and subject in res.output and a_dir in res.output and b_dir in res.output
    assert "Atlantis" in res.output and "nothing was changed" in res.output
    assert git(b, "status", "--porcelain") == "" and git(b, "rev-parse", "HEAD") == head


def test_an_automatic_checkpoint_seals_the_history_from_dvc(team):
    """With `ledger.checkpoint_every: 1`, `editledger add` appends a checkpoint before the batch;
    `dvc repro -P` computes it (its own stage) and the batch on top; DVC no longer sees the sealed
    batches; verify from the checkpoint and from the base agree."""
    a = team["a"]
    dvc(a, "repro", "-P")  # alice2, added by the previous test
    params = yaml.safe_load((a / "params.yaml").read_text())
    params["ledger"] = {"checkpoint_every": 1}
    (a / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = {line.split(":")[0] for line in dvc(a, "stage", "list", "--all").stdout.splitlines()}
    f = requests_file(a, "alice3", RECORDS[7:8])
    out = cli(a, "add", "--requests", str(f)).output
    assert "checkpoint after 1 batches" in out
    ck, new = (line.split()[1].split("/")[1].rstrip(":") for line in out.splitlines() if line.startswith("added"))
    ran = ran_stages(dvc(a, "repro", "-P").stdout)
    assert ran[0] == f"ledger/{ck}/dvc.yaml:apply" and set(ran[1:]) == {
        f"ledger/{new}/dvc.yaml:{s}" for s in ("keys_values", "apply", "evaluate")}
    after = {line.split(":")[0] for line in dvc(a, "stage", "list", "--all").stdout.splitlines()}
    assert not any(p.startswith("ledger/") and ck not in p and new not in p for p in after)  # the rest is sealed
    assert len(before - after) >= 3 and ran_stages(dvc(a, "repro", "-P").stdout) == []
    fast = cli(a, "verify", "--replay").output
    assert f"from checkpoint {ck}" in fast and "ok: 2 entries verified (hash chain and replay)" in fast
    assert "ok: " in cli(a, "verify", "--replay", "--full").output
    log = json.loads(cli(a, "log", "--json").output)
    assert [r["kind"] for r in log if r["status"] != "superseded"][-2:] == ["checkpoint", "edit"]
