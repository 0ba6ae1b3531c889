"""``editledger rebase``: one line of history again after two clones appended in parallel.

Two clones that each append a batch and then merge their git histories leave both batch
directories in ``ledger/`` with one sequence number: the chain forks, and every reader and writer
refuses it (:func:`pipeline.ledger.layout.scan`).  Which directories came from upstream is a fact
about git, not about the ledger, so the caller passes them (``upstream``: directory names).

The resolution keeps the upstream line as it is and re-appends this clone's batches after its
last batch, in their order, as new batch directories: same kind, requests, method,
hyper-parameters, engine and seed; references to this clone's own batches (a revert/drop target,
an exact drop's plan, a re-application) mapped to their new directories; ``supersedes:`` naming the
original.  Their keys, values and deltas must be recomputed — they were computed on a state
without upstream's batches — and ``dvc repro -P`` computes exactly those.  The originals stay where
they are, off the main line, with ``superseded.json`` (``by``: the new directory); one that was
never computed also gets a ``.dvcignore`` so that DVC does not compute it now.

Refused before anything is written (:class:`RebaseConflictError`, naming both batches and the
subject), because re-appending would change what one side meant:

* **fact**: both sides edit the same fact (subject and relation — ``relation_id``, else the
  prompt) to different objects.  ``keep_local`` accepts it: the re-appended edit comes after
  upstream's and wins, as any later re-edit does;
* **removal**: a revert or drop on one side of an entry the other side built on — on this side,
  any revert/drop whose target is upstream's too (re-appended after upstream's batches it would
  act on them); upstream, a revert to a state before the fork point or a drop of an entry at or
  before it.

``skip`` leaves named batches of this side out: they stay, superseded by nothing.

Crash safety: every ``superseded.json`` is written first (each holds the whole plan), then the new
directories.  In between, :func:`~pipeline.ledger.layout.scan` refuses the ledger as an
interrupted rebase, and running the rebase again writes what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pipeline.ledger import atomic
from pipeline.ledger.batch import Batch, StageFile, read_batch, read_requests, write_batch_dir
from pipeline.ledger.entry import BASE
from pipeline.ledger.errors import LedgerError
from pipeline.ledger.layout import (DVCIGNORE_FILE, SUPERSEDED_FILE, EntryDir, scan_all, split_lines,
                                    superseded_marker)
from pipeline.ledger.append import reseal
from pipeline.ledger.lock import LedgerLock

# what a directory hidden from DVC ignores: its own stage file and DVC's record of it
DVCIGNORE_TEXT = "# superseded by `editledger rebase` before it was computed: not a stage of the pipeline\n/dvc.yaml\n/dvc.lock\n"


class RebaseConflictError(LedgerError):
    """The two sides cannot be put on one line without changing what one of them meant."""

    def __init__(self, conflicts: list[Conflict]):
        self.conflicts = conflicts
        super().__init__(f"rebase refused, nothing was changed: {len(conflicts)} conflict(s): "
                         + "; ".join(c.message() for c in conflicts)
                         + ". Choose: `--skip DIR` leaves a batch of this clone out (it stays, superseded), "
                           "`--keep-local` re-appends fact conflicts anyway (this clone's edit then wins)")


@dataclass(frozen=True)
class Conflict:
    """One reason to refuse: the local and the upstream batch involved and the subject concerned."""

    kind: str  # "fact" | "removal"
    local: str
    upstream: str
    subject: str
    detail: str

    def message(self) -> str:
        return f"{self.kind} conflict on {self.subject!r}: local {self.local} vs upstream {self.upstream} ({self.detail})"


@dataclass
class RebasePlan:
    """What a rebase keeps and re-appends; ``moves`` = (original directory, new batch) in order."""

    onto: str  # the upstream line's last directory
    fork_point: str | None  # the last directory both sides share (None: they share nothing)
    upstream_after: list[str]  # upstream's batches after the fork point
    local: list[str]  # this side's batches after the fork point, in order
    moves: list[tuple[str, Batch, list]] = field(default_factory=list)  # (original, new batch, its requests)
    skipped: list[str] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)

    def new_name(self, batch: Batch, requests: list) -> str:
        return batch.dirname([r.canonical() for r in requests] if batch.kind == "edit" else None)

    @property
    def mapping(self) -> dict[str, str]:
        return {old: self.new_name(b, reqs) for old, b, reqs in self.moves}


def _line(dirs: list[EntryDir], batches: dict[str, Batch], what: str) -> None:
    """Check that ``dirs`` is one chain (each batch's parent is the one before)."""
    for prev, d in zip(dirs, dirs[1:]):
        if batches[d.name].parent != prev.name:
            raise LedgerError(f"the {what} batches are not one line: {d.name} follows {batches[d.name].parent}, "
                              f"not {prev.name}")


def _facts(path: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(subject, relation) → (subject as written, object) of an edit batch's requests."""
    return {(r.subject.strip().lower(), r.relation_id or r.prompt): (r.subject, r.target_new)
            for r in read_requests(path)}


def _subjects(ledger: Path, names: Iterable[str], batches: dict[str, Batch]) -> str:
    subjects = sorted({r.subject for n in names if batches[n].kind == "edit" for r in read_requests(ledger / n)})
    return ", ".join(subjects[:3]) + (f" and {len(subjects) - 3} more" if len(subjects) > 3 else "") or "no requests"


def _removal_conflicts(ledger: Path, plan: RebasePlan, batches: dict[str, Batch], common: list[str]) -> list[Conflict]:
    out = []
    seq_of = {n: batches[n].seq for n in batches}
    fork_seq = seq_of[plan.fork_point] if plan.fork_point else 0
    for n in plan.local:  # this side: any target upstream has too acts on upstream's batches once re-appended
        b = batches[n]
        if b.kind in ("revert", "drop") and (b.target == BASE or b.target in common):
            removed = [c for c in common if seq_of[c] > (0 if b.target == BASE else seq_of[b.target])]
            removed = [b.target] if b.kind == "drop" else removed + plan.upstream_after
            out.append(Conflict("removal", n, plan.upstream_after[0], _subjects(ledger, removed, batches),
                                f"this clone's {b.kind} of {b.target} would act on upstream's batches"))
    for n in plan.upstream_after:  # upstream: removing what this side was computed on
        b = batches[n]
        if b.kind == "revert" and (b.target == BASE or seq_of[b.target] < fork_seq):
            start = 0 if b.target == BASE else seq_of[b.target]
            removed = [c for c in common if seq_of[c] > start]
        elif b.kind == "drop" and b.target in common:
            removed = [b.target]
        else:
            continue
        if removed and plan.local:
            out.append(Conflict("removal", plan.local[0], n, _subjects(ledger, removed, batches),
                                f"upstream's {b.kind} of {b.target} removes what this clone's batches were computed on"))
    return out


def _fact_conflicts(ledger: Path, plan: RebasePlan, batches: dict[str, Batch]) -> list[Conflict]:
    theirs = {n: _facts(ledger / n) for n in plan.upstream_after if batches[n].kind == "edit"}
    out = []
    for n in plan.local:
        if batches[n].kind != "edit":
            continue
        for key, (subject, obj) in _facts(ledger / n).items():
            for u, facts in theirs.items():
                if key in facts and facts[key][1] != obj:
                    out.append(Conflict("fact", n, u, subject, f"{key[1]!s}: local → {obj!r}, upstream → "
                                                                f"{facts[key][1]!r}"))
    return out


def _reappended(old: Batch, seq: int, parent: str, mapping: dict[str, str], original: str) -> Batch:
    """The new batch: the original's add-time content, references to re-appended batches mapped."""
    def m(name: str | None) -> str | None:
        return mapping.get(name, name) if name is not None else None

    return Batch(seq, old.kind, parent, method=old.method, engine=old.engine, seed=old.seed, hparams=old.hparams,
                 reapplies=m(old.reapplies), target=old.target if old.target == BASE else m(old.target),
                 mode=old.mode, reapply=tuple(m(x) for x in old.reapply), supersedes=original)


def plan_rebase(ledger_dir: str | Path, upstream: Iterable[str], *, skip: Iterable[str] = (),
                keep_local: bool = False) -> RebasePlan:
    """Work out a rebase without writing anything (raises :class:`RebaseConflictError`)."""
    ledger = Path(ledger_dir)
    main, _ = split_lines(scan_all(ledger))
    ups = set(upstream)
    batches = {d.name: read_batch(d.path) for d in main}
    up_line = [d for d in main if d.name in ups]
    local = [d for d in main if d.name not in ups]
    if not up_line:
        raise LedgerError("upstream has no batch directory this ledger has: is the upstream reference right?")
    if [d.seq for d in up_line] != list(range(1, len(up_line) + 1)):
        raise LedgerError("upstream's batch directories are not numbered 1, 2, 3, …: is the upstream reference right?")
    _line(up_line, batches, "upstream")
    if not local:
        raise LedgerError("nothing to rebase: every batch of this ledger is upstream's")
    _line(local, batches, "local")
    fork_point = batches[local[0].name].parent
    if fork_point is not None and fork_point not in ups:
        raise LedgerError(f"this clone's first own batch {local[0].name} follows {fork_point}, which upstream does not "
                          "have")
    if fork_point == up_line[-1].name:
        raise LedgerError("nothing to rebase: this clone's batches already follow upstream's last batch")
    fork_seq = batches[fork_point].seq if fork_point else 0
    plan = RebasePlan(up_line[-1].name, fork_point, [d.name for d in up_line if d.seq > fork_seq],
                      [d.name for d in local])
    unknown = sorted(set(skip) - set(plan.local))
    if unknown:
        raise LedgerError(f"--skip {', '.join(unknown)}: not a batch of this clone after the fork point "
                          f"(those are: {', '.join(plan.local)})")
    plan.skipped = [n for n in plan.local if n in set(skip)]
    common = [d.name for d in up_line if d.seq <= fork_seq]
    kept = [n for n in plan.local if n not in plan.skipped]
    for n in kept:
        refs = [batches[n].reapplies, *batches[n].reapply, *([batches[n].target] if batches[n].kind == "drop" else [])]
        dropped = [r for r in refs if r in plan.skipped]
        if dropped:
            raise LedgerError(f"{n} refers to {dropped[0]}, which --skip leaves out: skip it too")
    conflicts = [c for c in _removal_conflicts(ledger, plan, batches, common) + _fact_conflicts(ledger, plan, batches)
                 if c.local in kept and not (keep_local and c.kind == "fact")]
    if conflicts:
        raise RebaseConflictError(conflicts)
    mapping: dict[str, str] = {}
    parent, seq = plan.onto, len(up_line)
    for n in kept:
        seq += 1
        new = _reappended(batches[n], seq, parent, mapping, n)
        reqs = read_requests(ledger / n) if new.kind == "edit" else None
        plan.moves.append((n, new, reqs))
        mapping[n] = parent = plan.new_name(new, reqs)
    return plan


def _marker(plan: RebasePlan, old: str) -> dict:
    return {"by": plan.mapping.get(old), "onto": plan.onto, "fork_point": plan.fork_point,
            "moves": [[o, plan.mapping[o]] for o, _, _ in plan.moves], "skipped": plan.skipped}


def _resume(ledger: Path) -> RebasePlan | None:
    """The plan of an interrupted rebase (a marker whose new directory is missing), rebuilt from its
    markers and the originals' inputs; None when no rebase is unfinished."""
    for d in scan_all(ledger):
        doc = superseded_marker(d)
        if doc is None or doc.get("by") is None or (ledger / doc["by"]).is_dir():
            continue
        plan = RebasePlan(doc["onto"], doc["fork_point"], [], [o for o, _ in doc["moves"]], skipped=doc["skipped"])
        mapping = dict(doc["moves"])
        parent, seq = doc["onto"], read_batch(ledger / doc["onto"]).seq
        for old, new_name in doc["moves"]:
            seq += 1
            new = _reappended(read_batch(ledger / old), seq, parent, mapping, old)
            reqs = read_requests(ledger / old) if new.kind == "edit" else None
            plan.moves.append((old, new, reqs))
            parent = new_name
        return plan
    return None


def rebase(ledger_dir: str | Path, upstream: Iterable[str], *, skip: Iterable[str] = (), keep_local: bool = False,
           stage_file: StageFile | None = None) -> RebasePlan:
    """Re-append this clone's batches after upstream's (see the module docstring); under the lock.
    Returns the plan carried out (``mapping``: original → new directory)."""
    ledger = Path(ledger_dir)
    with LedgerLock(ledger):
        plan = _resume(ledger) or plan_rebase(ledger, upstream, skip=skip, keep_local=keep_local)
        for old in plan.local:
            path = ledger / old
            if not (path / SUPERSEDED_FILE).exists():
                atomic.write_json(path / SUPERSEDED_FILE, _marker(plan, old))
            if not (path / "state.json").exists() and not (path / DVCIGNORE_FILE).exists():
                atomic.write_text(path / DVCIGNORE_FILE, DVCIGNORE_TEXT)
        for old, batch, reqs in plan.moves:
            if not (ledger / plan.mapping[old]).is_dir():
                write_batch_dir(ledger, batch, reqs, stage_file)
        reseal(ledger)  # this side's checkpoints, now superseded, may have sealed batches upstream still needs
        return plan


__all__ = ["Conflict", "RebaseConflictError", "RebasePlan", "plan_rebase", "rebase"]
