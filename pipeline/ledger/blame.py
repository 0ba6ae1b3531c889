"""Which entries touched a fact: every batch (active or not, superseded ones included) whose
requests name a subject, with what each asked for and what became of it.

An auditor asks "why does the model say this?".  The answer starts with the history of the
subject: each request that named it, in which batch, with which method, whether that batch is
part of the active state now and, if not, which later entry took it out (a revert, a drop, the
collapse guard, or a rebase that re-appended it elsewhere).  Requests are read from each batch's
add-time ``requests.parquet`` (git-tracked, so even a batch that was never computed is found);
ids, times and states come from the committed chain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.ledger.batch import BatchError, read_batch, read_requests
from pipeline.ledger.chain import ChainState
from pipeline.ledger.entry import Entry
from pipeline.ledger.layout import EntryDir, scan_all, split_lines
from pipeline.ledger.store import load


@dataclass
class BlameRow:
    """One request that named the subject, and the batch it came with."""

    seq: int
    dir: str
    id: str | None  # the entry id once computed
    method: str | None
    status: str  # committed | refused | pending | interrupted | superseded
    active: bool  # part of the active state now
    removed_by: str | None  # the entry (or rebase) that took it out of the active state
    created_at: str | None  # when its entry was committed
    subject: str
    relation_id: str | None
    prompt: str  # the template with the subject filled in
    target_new: str
    target_true: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def _removed_by(e: Entry, chain: list[Entry], states: list[ChainState]) -> str | None:
    """The first later entry whose state no longer holds ``e`` (an edit that was active)."""
    for later, s in zip(chain[e.seq:], states[e.seq:]):
        if e.id not in s.active:
            return f"{later.dirname} ({later.kind})"
    return None


def _matches(req, subject: str, relation: str | None) -> bool:
    return req.subject.strip().lower() == subject and (relation is None or req.relation_id == relation)


def blame(ledger_dir: str | Path, subject: str, relation: str | None = None) -> list[BlameRow]:
    """Every request naming ``subject`` (case-insensitive; only ``relation`` if given), in batch order,
    the superseded batches after the main line."""
    ledger = Path(ledger_dir)
    key = subject.strip().lower()
    chain, states = load(ledger, missing_ok=True)
    by_dir = {e.dirname: e for e in chain}
    active = set(states[-1].active) if states else set()
    main, superseded = split_lines(scan_all(ledger, missing_ok=True))
    rows = []
    for d in [*main, *superseded]:
        rows += _rows(d, d in superseded, by_dir.get(d.name), key, relation, active, chain, states)
    return rows


def _rows(d: EntryDir, superseded: bool, e: Entry | None, key: str, relation: str | None, active: set[str],
          chain: list[Entry], states: list[ChainState]) -> list[BlameRow]:
    try:
        b = read_batch(d.path)
        if b.kind != "edit":
            return []
        reqs = [r for r in read_requests(d.path) if _matches(r, key, relation)]
    except BatchError:
        return []
    if not reqs:
        return []
    if superseded:
        status, on, removed = "superseded", False, f"re-appended by `editledger rebase` (see {d.name}/superseded.json)"
    elif e is None:
        status, on, removed = d.status, False, None
    else:
        on = e.id in active
        status = e.manifest["status"]
        removed = ("the collapse guard (never applied)" if e.refused else
                   None if on else _removed_by(e, chain, states))
    created = e.manifest["created_at"] if e is not None else None
    return [BlameRow(d.seq, d.name, e.id if e is not None else None, b.method, status, on, removed, created,
                     r.subject, r.relation_id, r.prompt.replace("{}", r.subject), r.target_new, r.target_true)
            for r in reqs]


__all__ = ["BlameRow", "blame"]
