"""``verify``: is the ledger intact, and does replaying it give the recorded weights bit for bit?

Checks, in entry order, stopping at the FIRST bad entry (everything after it hangs off a broken
link, so further reports would only be noise):

* every file of a committed entry: ``state.json`` canonical and sealed by its digest,
  ``entry.json`` canonical and hashing to the entry id, every file listed in the manifest
  (add-time inputs, keys/values outputs, deltas) matching its sha256, delta tensors as recorded,
  and the evaluation (``metrics.json`` sealed, naming this entry, ``eval.parquet`` as recorded);
* the chain: dense sequence numbers, each parent = the previous id, one base model, fingerprints
  that connect, reverts/drops that make sense, recorded active sets that match the chain;
* with ``replay=True``: the base model from ``load_base()`` has the recorded base fingerprint, and
  replaying the active chain after each entry reproduces the recorded before/after weight
  fingerprints (full model and edited parameters) exactly.

By default the check starts at the last checkpoint (``full=True``: at the first entry, and every
checkpoint is checked against the chain before it), so its cost does not grow with the history.

Batches without a committed entry (pending, or an interrupted apply) are listed, not failed: they
were never committed and are never active.  A committed entry *after* such a batch is a failure
(stale: it hangs off a history that is being recomputed; ``dvc repro -P`` finishes that).  The
result is a structured object; the CLI prints it and exits non-zero when ``ok`` is false.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import pandas as pd

from pipeline.ledger.chain import EMPTY, ChainState
from pipeline.ledger.entry import Entry
from pipeline.ledger.errors import LedgerCorruptError
from pipeline.ledger.batch import BatchError, read_batch
from pipeline.ledger.layout import (INDEX_FILE, UNLISTED_FILES, EntryDir, last_checkpoint, scan, scan_all, split_lines,
                                    superseded_marker)
from pipeline.ledger.store import (BeforeCheckpointError, load_deltas, load_snapshot, read_entry, read_evaluation,
                                   walk)

if TYPE_CHECKING:
    from torch import nn


@dataclass
class VerifyIssue:
    dirname: str
    entry_id: str | None  # full id when readable, else None (the directory name holds its prefix)
    seq: int | None
    reason: str
    stage: str  # "files" (hashes, chain, structure) | "replay"


@dataclass
class VerifyResult:
    ok: bool
    entries: int  # committed entries found
    checked: int  # committed entries that passed, in order, before the first bad one
    first_bad: VerifyIssue | None = None
    incomplete: list[str] = field(default_factory=list)
    replayed: bool = False
    warnings: list[str] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)  # off the main line after a rebase, checked too
    sealed: int = 0  # entries before the checkpoint the check started at (checked when it was made)
    from_checkpoint: str | None = None

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        if self.ok:
            how = "hash chain and replay" if self.replayed else "hash chain"
            kept = (f"; {len(self.superseded)} superseded batch(es) kept off the main line"
                    if self.superseded else "")
            start = (f" from checkpoint {self.from_checkpoint}, which seals the {self.sealed} before it "
                     "(`verify --full` checks those too)" if self.from_checkpoint else "")
            return f"ok: {self.checked} entries verified ({how}){start}{kept}" + (
                f"; {len(self.incomplete)} uncommitted batch{'' if len(self.incomplete) == 1 else 'es'} (pending or "
                f"interrupted: `dvc repro -P` computes them): {', '.join(self.incomplete)}" if self.incomplete else "")
        b = self.first_bad
        return f"FAILED at {b.dirname}{f' ({b.entry_id})' if b.entry_id else ''}: {b.reason}"


def _issue(exc: LedgerCorruptError, stage: str = "files") -> VerifyIssue:
    seq = int(exc.dirname.split("-", 1)[0]) if exc.dirname[:1].isdigit() else None
    return VerifyIssue(exc.dirname, exc.entry_id, seq, exc.reason, stage)


def _replay(chain: list[Entry], states: list[ChainState], load_base: Callable[[], nn.Module]) -> VerifyIssue | None:
    """Rebuild every state and check its fingerprints; a chain that starts at a checkpoint starts
    from its saved weights (whose full-model fingerprint is then checked like any state's), and a
    checkpoint met on the way must hold exactly the weights replayed up to it.  (torch and the model
    code are imported here: checking files and the chain needs neither.)"""
    import torch

    from pipeline.ledger.weights import Replayer, check_record
    from pipeline.models.loading import model_fingerprint

    model = load_base()
    first = chain[0]
    if model_fingerprint(model) != first.base_fingerprint:
        return VerifyIssue(first.dirname, first.id, first.seq, "the base model given for replay is not the ledger's "
                           "base model (fingerprint differs)", "replay")
    by_id = {e.id: e for e in chain}
    rep = Replayer(model, lambda eid: load_deltas(by_id[eid]))
    prev = EMPTY
    if first.kind == "checkpoint":
        rep.start_from(states[0].ops, load_snapshot(first))
        prev = states[0]
    for e, s in zip(chain, states):
        try:
            rep.goto(prev.ops)
            why = check_record(model, e.fingerprints["before"], full=False)
            if why:
                return VerifyIssue(e.dirname, e.id, e.seq, f"replayed weights before the entry: {why}", "replay")
            rep.goto(s.ops)
            if e.kind == "checkpoint" and e is not first:
                params = dict(model.named_parameters())
                if not all(torch.equal(params[n], w) for n, w in load_snapshot(e).items()):
                    return VerifyIssue(e.dirname, e.id, e.seq, "its saved weights differ from the replayed state",
                                       "replay")
        except LedgerCorruptError as exc:
            return _issue(exc, "replay")
        why = check_record(model, e.fingerprints["after"])
        if why:
            return VerifyIssue(e.dirname, e.id, e.seq, f"replayed weights after the entry: {why}", "replay")
        prev = s
    return None


def _check_index(e: Entry, before: list[Entry]) -> None:
    """A checkpoint's index lists exactly the main-line entries before it (directory, id), in order."""
    try:
        index = pd.read_parquet(e.path / INDEX_FILE, columns=["dir", "id", "status"])
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise LedgerCorruptError(e.dirname, f"{INDEX_FILE} is unreadable ({exc})", e.id) from None
    main = index[index["status"] != "superseded"]
    if list(main["dir"]) != [x.dirname for x in before] or list(main["id"]) != [x.id for x in before]:
        raise LedgerCorruptError(e.dirname, f"{INDEX_FILE} does not list the entries before it", e.id)


def _check_superseded(root: Path, d: EntryDir) -> None:
    """A superseded batch: its marker names the batch that re-appends it, whose ``batch.yaml``
    says so; a committed one's files are intact (it is history too)."""
    by = superseded_marker(d)["by"]
    if by is not None:
        try:
            successor = read_batch(root / by)
        except BatchError as exc:
            raise LedgerCorruptError(d.name, f"it is superseded by {by}, which is unreadable ({exc})") from None
        if successor.supersedes != d.name:
            raise LedgerCorruptError(d.name, f"superseded.json names {by}, but {by} does not supersede it")
    if d.committed:
        read_entry(d, check_files=True)


def _walk(root: Path, result: VerifyResult, since_checkpoint: bool) -> tuple[list[Entry], list[ChainState]]:
    """Check every file of every entry read (from the last checkpoint, or all of them) into ``result``."""
    chain: list[Entry] = []
    states: list[ChainState] = []
    try:
        for e, s in walk(root, check_files=True, since_checkpoint=since_checkpoint):
            read_evaluation(e)  # raises LedgerCorruptError for a modified metrics.json / eval.parquet
            if e.kind == "checkpoint" and chain:
                _check_index(e, [x for x in chain if x.seq < e.seq])
            chain.append(e)
            states.append(s)
            result.checked += 1
            extra = sorted(p.name for p in e.path.iterdir()
                           if p.name not in e.manifest["files"] and p.name not in UNLISTED_FILES)
            if extra:
                result.warnings.append(f"{e.dirname}: files not listed in the manifest: {', '.join(extra)}")
    except LedgerCorruptError as exc:
        result.ok, result.first_bad = False, _issue(exc)
    return chain, states


def verify(ledger_dir: str | Path, replay: bool = False, load_base: Callable[[], nn.Module] | None = None,
           full: bool = False) -> VerifyResult:
    """Check the ledger; ``replay`` needs ``load_base()`` returning a fresh base model.

    By default the check starts at the last checkpoint (its files, then every entry after it, and
    the replay from its saved weights): the entries it seals were checked when it was made.
    ``full`` checks every entry from the first, and each checkpoint against the chain before it
    (its index, and with ``replay`` its saved weights against the replayed ones)."""
    root = Path(ledger_dir)
    if not root.is_dir():
        return VerifyResult(False, 0, 0, VerifyIssue(str(root), None, None, "no ledger directory", "files"))
    if replay and load_base is None:
        raise ValueError("verify(replay=True) needs load_base=callable returning the base model")
    try:
        dirs = scan(root)
    except LedgerCorruptError as exc:
        return VerifyResult(False, 0, 0, _issue(exc))
    committed = [d for d in dirs if d.committed]
    result = VerifyResult(True, len(committed), 0, incomplete=[d.name for d in dirs if not d.committed])
    last = last_checkpoint(dirs)
    try:
        for d in split_lines(scan_all(root))[1]:
            if full or last is None or d.seq >= last.seq:  # behind the checkpoint: `--full` only

                _check_superseded(root, d)
            result.superseded.append(d.name)
    except LedgerCorruptError as exc:
        return VerifyResult(False, len(committed), 0, _issue(exc), result.incomplete)
    try:
        chain, states = _walk(root, result, since_checkpoint=not full)
    except BeforeCheckpointError:
        result.checked, result.warnings = 0, []
        chain, states = _walk(root, result, since_checkpoint=False)
    if chain and chain[0].kind == "checkpoint" and chain[0].seq > 1:
        result.sealed = chain[0].seq - 1
        result.from_checkpoint = chain[0].dirname
    if states and states[-1].pending is not None:
        p = states[-1].pending
        result.warnings.append(f"the exact drop {p.drop_id[:12]} is unfinished: {len(p.remaining)} batch(es) "
                               "still to re-apply")
    if states and states[-1].approximate:
        result.warnings.append("the active state contains a fast (approximate) drop")
    if replay and result.ok and chain:
        bad = _replay(chain, states, load_base)
        result.replayed = True
        if bad is not None:
            result.ok, result.first_bad = False, bad
            result.checked = bad.seq - chain[0].seq if bad.seq else result.checked
    return result
