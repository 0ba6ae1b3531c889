"""Two clones, one history, at the ledger level (tiny model, fake deltas; the DVC + git end-to-end
version is tests/test_collaboration.py): a merged ledger whose chain forks is refused by readers
and writers naming both sides; ``rebase`` keeps upstream and re-appends this clone's batches with
``supersedes``; conflicts are refused before anything is written; an interrupted rebase resumes."""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path

import pytest

from pipeline.ledger import append_edit, append_revert, entries, materialize, verify
from pipeline.ledger.batch import read_batch
from pipeline.ledger.commit import commit_edit
from pipeline.ledger.errors import LedgerError, LedgerForkError
from pipeline.ledger.layout import SUPERSEDED_FILE, scan, scan_all
from pipeline.ledger.rebase import RebaseConflictError, rebase
from pipeline.models.loading import model_fingerprint
from test_ledger_support import COV, HP, add, batch_requests, fake_deltas, tiny_model


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def clones(tmp_path):
    """A shared first batch, then clone A appends batch 2 and clone B appends batch 3 (both at seq 2)."""
    base = tiny_model()
    fp = model_fingerprint(base)
    origin = tmp_path / "origin"
    add(origin, copy.deepcopy(base), 1, fp)
    out = {"base": base, "fp": fp}
    for name, n in (("A", 2), ("B", 3)):
        shutil.copytree(origin, tmp_path / name)
        model = materialize(tmp_path / name, None, base)
        add(tmp_path / name, model, n, fp)
        out[name] = tmp_path / name
    return out


def merge(into: Path, other: Path) -> None:
    """What `git merge` + `dvc pull` leave: the union of both sides' batch directories."""
    for d in other.iterdir():
        if d.is_dir() and not (into / d.name).exists():
            shutil.copytree(d, into / d.name)


def compute(ledger: Path, base, fp: str, n: int) -> None:
    """Commit the next pending batch with fake deltas on the state of its parent (what DVC would do)."""
    pending = [d for d in scan(ledger) if not d.committed][0]
    model = materialize(ledger, read_batch(pending.path).parent, base)
    commit_edit(pending.path, base_fingerprint=fp, covariance_ids=COV, deltas=fake_deltas(model, n), model=model)


def test_a_forked_ledger_is_refused_naming_both_sides(clones):
    a, b = clones["A"], clones["B"]
    upstream = {d.name for d in scan(a)}
    b_id = entries(b)[1].id
    merge(b, a)
    names = sorted(d.name for d in scan_all(b) if d.seq == 2)
    with pytest.raises(LedgerForkError) as exc:
        scan(b)
    msg = str(exc.value)
    assert f"entry {b_id[:12]}" in msg
    assert all(n in msg for n in names) and "editledger rebase" in msg and "forks at batch 0002" in msg
    assert f"entry {entries(a)[1].id[:12]}" in msg  # committed sides are named by entry id too
    r = verify(b)
    assert not r.ok and "forks" in r.first_bad.reason
    before = tree(b)
    model = materialize(a, None, clones["base"])  # any writer refuses it, changing nothing
    with pytest.raises(LedgerForkError):
        add(b, model, 4, clones["fp"])
    with pytest.raises(LedgerForkError):
        append_revert(b, "1")
    assert tree(b) == before
    assert upstream < {d.name for d in scan_all(b)}


def test_rebase_keeps_upstream_and_reappends_this_clone(clones):
    a, b, base, fp = clones["A"], clones["B"], clones["base"], clones["fp"]
    upstream = [d.name for d in scan(a)]
    b_own = scan(b)[1].name
    b_entry = entries(b)[1]
    merge(b, a)
    plan = rebase(b, upstream)
    (new,) = plan.mapping.values()
    assert plan.fork_point == upstream[0] and plan.onto == upstream[1] and plan.local == [b_own]
    assert [d.name for d in scan(b)] == [*upstream, new]
    nb = read_batch(b / new)
    assert (nb.seq, nb.parent, nb.supersedes) == (3, upstream[1], b_own)
    assert (nb.method, nb.hparams) == (b_entry.method, b_entry.hparams)
    assert (b / b_own / SUPERSEDED_FILE).exists() and not (b / b_own / ".dvcignore").exists()  # computed: stays in DVC
    compute(b, base, fp, 3)
    chain = entries(b)
    assert [e.dirname for e in chain] == [*upstream, new]
    assert chain[2].requests == b_entry.requests and chain[2].parent == entries(a)[1].id
    r = verify(b, replay=True, load_base=lambda: copy.deepcopy(base))
    assert r.ok and r.checked == 3 and r.superseded == [b_own], r.message()
    assert "1 superseded batch(es)" in r.message()
    # the superseded original is still checked: a changed byte in it is named
    path = b / b_own / "entry.json"
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"kind"', b'"kinD"'))
    r = verify(b)
    assert not r.ok and r.first_bad.dirname == b_own
    path.write_bytes(data)
    with pytest.raises(LedgerError, match="nothing to rebase"):
        rebase(b, upstream + [new])


def test_a_pending_original_is_hidden_from_dvc(clones, tmp_path):
    a, b = clones["A"], clones["B"]
    model = materialize(b, None, clones["base"])
    from pipeline.ledger import add_edit

    add_edit(b, batch_requests(4), "fake", HP)  # added, never computed
    merge(b, a)
    pending = scan_all(b)[-1].name
    rebase(b, [d.name for d in scan(a)])
    assert (b / pending / ".dvcignore").read_text().splitlines()[1:] == ["/dvc.yaml", "/dvc.lock"]
    assert model is not None


def test_conflicting_facts_are_refused_and_nothing_changes(clones, tmp_path):
    a, b, base, fp = clones["A"], clones["B"], clones["base"], clones["fp"]
    upstream = [d.name for d in scan(a)]
    # B re-edits A's fact "Subject 2.0 is located in" to another object, on its own line
    model = materialize(b, None, base)
    req = [{**batch_requests(2)[0], "target_new": "Atlantis"}]
    append_edit(b, fp, req, "fake", HP, COV, fake_deltas(model, 9), model=model)
    merge(b, a)
    before = tree(b)
    with pytest.raises(RebaseConflictError) as exc:
        rebase(b, upstream)
    (c,) = exc.value.conflicts
    assert c.kind == "fact" and c.subject == "Subject 2.0" and c.upstream == upstream[1]
    assert c.local == scan_all(b)[-1].name and "Atlantis" in str(exc.value) and "Place 2.0" in str(exc.value)
    assert tree(b) == before  # nothing changed until the user chooses
    plan = rebase(b, upstream, keep_local=True)  # the user's choice: this clone's edit comes later and wins
    assert len(plan.mapping) == 2


def test_a_revert_of_what_the_other_side_built_on_is_refused(clones):
    a, b = clones["A"], clones["B"]
    upstream = [d.name for d in scan(a)]
    append_revert(b, "base")  # this clone reverts everything, including the shared batch upstream built on
    merge(b, a)
    before = tree(b)
    with pytest.raises(RebaseConflictError) as exc:
        rebase(b, upstream)
    (c,) = exc.value.conflicts
    assert c.kind == "removal" and c.upstream == upstream[1] and "Subject 1.0" in c.subject
    assert tree(b) == before
    plan = rebase(b, upstream, skip=[scan_all(b)[-1].name])  # leave the revert out
    assert len(plan.mapping) == 1 and plan.skipped


def test_upstream_dropping_a_shared_entry_conflicts(clones):
    a, b = clones["A"], clones["B"]
    append_revert(a, "base")
    upstream = [d.name for d in scan(a)]
    b_own = scan(b)[1].name
    merge(b, a)
    with pytest.raises(RebaseConflictError) as exc:
        rebase(b, upstream)
    (c,) = exc.value.conflicts
    assert (c.kind, c.local, c.upstream) == ("removal", b_own, upstream[-1]) and "Subject 1.0" in c.subject


def test_an_interrupted_rebase_is_refused_then_finished(clones, monkeypatch):
    a, b = clones["A"], clones["B"]
    upstream = [d.name for d in scan(a)]
    merge(b, a)
    import pipeline.ledger.rebase as rb

    def crash(*args, **kw):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(rb, "write_batch_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        rebase(b, upstream)
    with pytest.raises(LedgerError, match="rebase` was interrupted"):
        scan(b)
    monkeypatch.undo()
    plan = rebase(b, upstream)
    assert [d.name for d in scan(b)] == [*upstream, *plan.mapping.values()]


def test_a_checkpoint_of_this_side_is_reappended_and_unsealed(clones):
    """B checkpointed after the fork: its seal (ledger/.dvcignore, merged by union) would hide A's
    batch from DVC; the rebase re-appends the checkpoint and rewrites the seal for the merged line."""
    import pathspec

    from pipeline.ledger.append import add_checkpoint
    from pipeline.ledger.commit import commit_checkpoint
    from pipeline.stages.summary import ledger_table, parquet_bytes

    a, b, base = clones["A"], clones["B"], clones["base"]
    upstream = [d.name for d in scan(a)]
    path = add_checkpoint(b)
    commit_checkpoint(path, copy.deepcopy(base), parquet_bytes(ledger_table(b, before_seq=3)))
    merge(b, a)

    def sealed() -> list[bool]:
        spec = pathspec.GitIgnoreSpec.from_lines((b / ".dvcignore").read_text().splitlines())
        return [spec.match_file(d.name + "/") for d in scan(b)]

    plan = rebase(b, upstream)
    assert [read_batch(b / n).kind for n in plan.mapping.values()] == ["edit", "checkpoint"]
    assert sealed() == [False] * 4  # nothing computed is behind a checkpoint of the merged line yet
