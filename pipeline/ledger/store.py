"""Reading the ledger: committed entries in order, checked as a hash chain.

An entry is *committed* when its directory holds ``state.json`` (see :mod:`pipeline.ledger.layout`).
Committed entries form a dense prefix of the batch directories; the directories after it are
pending (not computed yet) or interrupted (an apply that never reached its commit point).  Those
are never active and never read as entries; ``verify`` lists them.

Readers take no lock: a committed entry appears atomically with its ``state.json``, and a reader
that needs the state *before* a batch (the stages do) reads the chain only up to that batch's
parent (``upto=``), so it is not disturbed by later entries that DVC is about to recompute.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

if TYPE_CHECKING:  # only for annotations: readers of a ledger need no torch
    import torch

from pipeline.ledger import atomic
from pipeline.ledger.batch import BatchError, read_batch
from pipeline.ledger.chain import EMPTY, ChainError, ChainState, PendingDrop, step
from pipeline.ledger.entry import (BASE, Entry, active_matches, check_manifest, content_status, entry_id,
                                   manifest_digest, validate_content)
from pipeline.ledger.errors import (AmbiguousIdError, EntrySchemaError, LedgerCorruptError, LedgerError,
                                    UnknownEntryError)
from pipeline.ledger.layout import (BATCH_FILE, DELTAS_FILE, DIR_RE, ENTRY_FILE, EVAL_FILE, KEYS_FILE, METRICS_FILE,
                                    SNAPSHOT_FILE, STATE_FILE, EntryDir, incomplete_entries, last_checkpoint, scan)

_HEX_RE = re.compile(r"^[0-9a-f]+$")
MIN_PREFIX = 4


def _read_canonical_json(dirname: str, name: str, raw: bytes, entry: str | None = None) -> Any:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerCorruptError(dirname, f"{name} is not valid JSON ({exc})", entry) from None
    try:
        canonical = atomic.canonical_bytes(value)
    except (TypeError, ValueError):
        canonical = None
    if raw != canonical:
        raise LedgerCorruptError(dirname, f"{name} is not in canonical form (modified after writing?)", entry)
    return value


def _read_bytes(d: Path, name: str, dirname: str, entry: str | None) -> bytes:
    try:
        return (d / name).read_bytes()
    except OSError as exc:
        raise LedgerCorruptError(dirname, f"cannot read {name}: {exc.strerror or exc}", entry) from None


def read_entry(d: EntryDir, *, check_files: bool = False) -> Entry:
    """Read and check one committed entry directory.

    Always: ``state.json`` canonical and sealed by its digest; ``entry.json`` and ``batch.yaml``
    with their recorded sha256, ``entry.json`` canonical, well-formed and hashing to the entry id;
    directory name, seq, kind and parent consistent.  With ``check_files``: every other file in
    the manifest has its recorded sha256 and the deltas hold exactly the recorded tensors.
    """
    manifest = _read_canonical_json(d.name, STATE_FILE, _read_bytes(d.path, STATE_FILE, d.name, None))
    try:
        check_manifest(manifest)
    except EntrySchemaError as exc:
        raise LedgerCorruptError(d.name, f"{STATE_FILE}: {exc}") from None
    eid = manifest["id"]

    def bad(reason: str) -> LedgerCorruptError:
        return LedgerCorruptError(d.name, reason, eid)

    if manifest["dir"] != d.name:
        raise bad(f"state.json belongs to directory {manifest['dir']!r}, not to this one")
    if manifest["seq"] != d.seq:
        raise bad(f"state.json says seq {manifest['seq']}, the directory name says {d.seq}")
    files = manifest["files"]
    raw_entry = _read_bytes(d.path, ENTRY_FILE, d.name, eid)
    if atomic.sha256_bytes(raw_entry) != files[ENTRY_FILE]:
        raise bad(f"{ENTRY_FILE} does not match its sha256 in the manifest")
    content = _read_canonical_json(d.name, ENTRY_FILE, raw_entry, eid)
    try:
        validate_content(content)
    except EntrySchemaError as exc:
        raise bad(f"{ENTRY_FILE}: {exc}") from None
    if entry_id(content) != eid:
        raise bad(f"{ENTRY_FILE} does not hash to the entry id")
    if manifest["kind"] != content["kind"] or manifest["parent"] != content["parent"]:
        raise bad("state.json kind/parent differ from entry.json")
    if manifest["status"] != content_status(content):
        raise bad(f"state.json status {manifest['status']!r} contradicts the guard decision in entry.json")
    if atomic.sha256_bytes(_read_bytes(d.path, BATCH_FILE, d.name, eid)) != files[BATCH_FILE]:
        raise bad(f"{BATCH_FILE} does not match its sha256 in the manifest (inputs changed after the entry was "
                  "applied: `dvc repro -P` recomputes it and the batches after it)")
    try:
        batch = read_batch(d.path)
    except BatchError as exc:
        raise bad(str(exc)) from None
    if batch.kind != content["kind"]:
        raise bad("batch.yaml and entry.json disagree on the kind")
    has_deltas = content["kind"] == "edit"
    if has_deltas != (manifest["deltas"] is not None) or has_deltas != (DELTAS_FILE in files):
        raise bad("deltas are recorded for a non-edit entry or missing for an edit entry")
    entry = Entry(eid, d.seq, d.name, d.path, content, manifest, batch)
    if check_files:
        for name, sha in files.items():
            if name in (ENTRY_FILE, BATCH_FILE):
                continue
            data = _read_bytes(d.path, name, d.name, eid)
            if atomic.sha256_bytes(data) != sha:
                raise bad(f"{name} does not match its sha256 in the manifest")
            if name == DELTAS_FILE:
                _check_delta_tensors(entry, _load_safetensors(entry, data))
    return entry


def _load_safetensors(entry: Entry, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return atomic.load_safetensors_bytes(data)
    except Exception as exc:  # safetensors raises several types for damaged bytes
        raise LedgerCorruptError(entry.dirname, f"a safetensors file is unreadable ({exc})", entry.id) from None


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _check_delta_tensors(entry: Entry, tensors: Mapping[str, torch.Tensor]) -> None:
    spec = entry.delta_params
    if set(tensors) != set(spec):
        raise LedgerCorruptError(entry.dirname, "deltas hold other parameters than the manifest lists", entry.id)
    for n, t in tensors.items():
        if list(t.shape) != spec[n]["shape"] or dtype_name(t) != spec[n]["dtype"]:
            raise LedgerCorruptError(entry.dirname, f"delta {n} has another shape/dtype than recorded", entry.id)


def load_deltas(entry: Entry) -> dict[str, torch.Tensor]:
    """The deltas of an edit entry, after checking the file against the manifest's sha256."""
    if entry.kind != "edit":
        raise LedgerError(f"entry {entry.seq:04d} ({entry.short}) is a {entry.kind}; only edits have deltas")
    data = _read_bytes(entry.path, DELTAS_FILE, entry.dirname, entry.id)
    if atomic.sha256_bytes(data) != entry.manifest["files"][DELTAS_FILE]:
        raise LedgerCorruptError(entry.dirname, f"{DELTAS_FILE} does not match its sha256 in the manifest", entry.id)
    tensors = _load_safetensors(entry, data)
    _check_delta_tensors(entry, tensors)
    return tensors


def load_snapshot(entry: Entry) -> dict[str, torch.Tensor]:
    """A checkpoint's saved weights, after checking the file against the manifest's sha256."""
    data = _read_bytes(entry.path, SNAPSHOT_FILE, entry.dirname, entry.id)
    if atomic.sha256_bytes(data) != entry.manifest["files"].get(SNAPSHOT_FILE):
        raise LedgerCorruptError(entry.dirname, f"{SNAPSHOT_FILE} does not match its sha256 in the manifest", entry.id)
    return _load_safetensors(entry, data)


def load_keys(entry: Entry) -> dict[str, torch.Tensor] | None:
    """An edit entry's keys ("role@layer" → ``[N, d_in]``), checked against the manifest's sha256;
    None for an entry written before keys were kept."""
    if entry.kind != "edit" or KEYS_FILE not in entry.manifest["files"]:
        return None
    data = _read_bytes(entry.path, KEYS_FILE, entry.dirname, entry.id)
    if atomic.sha256_bytes(data) != entry.manifest["files"][KEYS_FILE]:
        raise LedgerCorruptError(entry.dirname, f"{KEYS_FILE} does not match its sha256 in the manifest", entry.id)
    return _load_safetensors(entry, data)


def read_evaluation(entry: Entry) -> dict | None:
    """The evaluate stage's ``metrics.json`` of an entry (checked), or None if not evaluated yet.

    It is sealed like the manifest, names the entry id it evaluated, and records the sha256 of
    ``eval.parquet``; an evaluation of an older version of the entry is reported as corrupt.
    """
    path = entry.path / METRICS_FILE
    if not path.exists():
        return None
    doc = _read_canonical_json(entry.dirname, METRICS_FILE, _read_bytes(entry.path, METRICS_FILE, entry.dirname,
                                                                        entry.id), entry.id)

    def bad(reason: str) -> LedgerCorruptError:
        return LedgerCorruptError(entry.dirname, f"{METRICS_FILE}: {reason}", entry.id)

    if not isinstance(doc, dict) or doc.get("digest") != manifest_digest(doc):
        raise bad("digest does not match its content")
    if doc.get("entry") != entry.id:
        raise bad("it evaluates another entry id (stale: `dvc repro -P` re-evaluates)")
    want = (doc.get("files") or {}).get(EVAL_FILE)
    if want is None or atomic.sha256_bytes(_read_bytes(entry.path, EVAL_FILE, entry.dirname, entry.id)) != want:
        raise bad(f"{EVAL_FILE} does not match its recorded sha256")
    return doc


class BeforeCheckpointError(LedgerError):
    """A reader that started at a checkpoint met an entry referring to one before it (a revert or
    drop far back): :func:`load` then reads the whole chain."""


def _references(e: Entry, state: ChainState) -> list[str]:
    """The earlier entries ``step`` reads for ``e``: its revert/drop target, re-application original,
    exact-drop plan, and the original a pending drop expects next."""
    refs = [x for x in (e.target, e.reapplies, *e.reapply_plan) if x is not None and x != BASE]
    if state.pending is not None:
        refs.append(state.pending.remaining[0])
    return refs


def walk(ledger_dir: str | Path, *, check_files: bool = False, missing_ok: bool = False,
         upto: str | None = None, since_checkpoint: bool = False) -> Iterator[tuple[Entry, ChainState]]:
    """Yield ``(entry, state after it)`` for committed entries in order, checking the chain.

    ``upto`` (a directory name) stops after that entry.  Raises :class:`LedgerCorruptError` at the
    first entry that fails: unreadable or modified files, a committed entry after an uncommitted
    one, a wrong parent, another base model, fingerprints that do not connect to the previous
    entry, or a structurally impossible revert/drop.

    ``since_checkpoint`` starts at the last computed checkpoint (at or before ``upto``): it is
    yielded first, with the state it records, and the entries before it are not read (it was
    checked against them when it was made; ``verify --full`` checks it again).  An entry after it
    that refers to one before it raises :class:`BeforeCheckpointError`.
    """
    states: dict[str, ChainState] = {}
    by_id: dict[str, Entry] = {}
    prev: Entry | None = None
    first: Entry | None = None
    state = EMPTY
    gap: EntryDir | None = None
    dirs = scan(ledger_dir, missing_ok=missing_ok)
    start = last_checkpoint(dirs, upto) if since_checkpoint else None
    if start is not None:
        prev = first = read_entry(start, check_files=check_files)
        if prev.kind != "checkpoint":
            raise LedgerCorruptError(start.name, f"holds {SNAPSHOT_FILE} but is a {prev.kind} entry", prev.id)
        state = ChainState(tuple((eid, sign) for eid, sign in prev.content["state"]))
        if not active_matches(prev.manifest["active"], state.active):
            raise LedgerCorruptError(start.name, "the recorded active entries differ from the checkpoint's state",
                                     prev.id)
        states[prev.id], by_id[prev.id] = state, prev
        yield prev, state
        if upto == start.name:
            return
        dirs = dirs[start.seq:]
    for d in dirs:
        if not d.committed:
            gap = gap or d
            if upto == d.name:
                raise LedgerError(f"batch {d.name} is not committed yet ({d.status}); run `dvc repro -P`")
            continue
        if gap is not None:
            raise LedgerCorruptError(d.name, f"committed, but the batch before it ({gap.name}) is not: its outputs "
                                     "are stale (an earlier batch changed); `dvc repro -P` recomputes it")
        e = read_entry(d, check_files=check_files)

        def bad(reason: str) -> LedgerCorruptError:
            return LedgerCorruptError(d.name, reason, e.id)

        if e.batch.parent != (prev.dirname if prev else None):
            raise bad("batch.yaml's parent is not the previous batch directory")
        if e.parent != (prev.id if prev else None):
            raise bad("its parent is not the previous entry's id (the hash chain is broken)")
        first = first or e
        if e.base_fingerprint != first.base_fingerprint:
            raise bad("its base-model fingerprint differs from the first entry's")
        before_fp = prev.fingerprints["after"]["model"] if prev else e.base_fingerprint
        if e.fingerprints["before"]["model"] != before_fp:
            raise bad("its 'before' weight fingerprint is not the previous state's")
        if (e.refused or e.kind == "checkpoint") and e.fingerprints["after"] != e.fingerprints["before"]:
            raise bad(f"a {'refused batch' if e.refused else 'checkpoint'} must leave the weights as they were "
                      "('after' differs from 'before')")
        if start is not None and any(r not in by_id for r in _references(e, state)):
            raise BeforeCheckpointError(f"{d.name} refers to an entry before the checkpoint {start.name}")
        try:
            state = step(state, e, states, by_id)
        except ChainError as exc:
            raise bad(str(exc)) from None
        if e.kind == "revert":
            target_fp = e.base_fingerprint if e.target == BASE else by_id[e.target].fingerprints["after"]["model"]
            if e.fingerprints["after"]["model"] != target_fp:
                raise bad("its 'after' fingerprint is not the fingerprint of the state it reverts to")
        if not active_matches(e.manifest["active"], state.active) or e.approximate != state.approximate:
            raise bad("the recorded active entries / approximate flag differ from what the chain implies")
        states[e.id] = state
        by_id[e.id] = e
        prev = e
        yield e, state
        if upto == d.name:
            return
    if upto is not None and (prev is None or prev.dirname != upto):
        raise UnknownEntryError(f"no batch directory {upto!r} in {ledger_dir}")


def load(ledger_dir: str | Path, *, missing_ok: bool = False, upto: str | None = None,
         since_checkpoint: bool = False) -> tuple[list[Entry], list[ChainState]]:
    """The committed chain (from the last checkpoint with ``since_checkpoint``, whenever the
    entries after it do not refer to older ones) and the state after each entry."""
    chain, states = [], []
    try:
        for e, s in walk(ledger_dir, missing_ok=missing_ok, upto=upto, since_checkpoint=since_checkpoint):
            chain.append(e)
            states.append(s)
    except BeforeCheckpointError:
        return load(ledger_dir, missing_ok=missing_ok, upto=upto)
    return chain, states


def entries(ledger_dir: str | Path) -> list[Entry]:
    """Committed entries in order, with files, ids and the parent chain checked (not the deltas' bytes)."""
    return load(ledger_dir)[0]


def label(e: Entry) -> str:
    return f"entry {e.seq:04d} ({e.short}, {e.kind})"


def resolve_ref(chain: Sequence[Entry], ref: str, *, allow_base: bool = True,
                incomplete: Iterable[str] = ()) -> Entry | str:
    """Find an entry by sequence number (``3``, ``0003``), id prefix (≥4 hex), directory name or ``base``.

    Digit-only references of up to 4 characters are sequence numbers (as printed by ``log``);
    anything else hexadecimal is an id prefix and must match exactly one entry.
    """
    r = str(ref).strip().lower()
    if r == BASE:
        if allow_base:
            return BASE
        raise UnknownEntryError("'base' is not an entry here")
    found: list[Entry]
    if DIR_RE.match(r):
        found = [e for e in chain if e.dirname == r]
    elif r.isdigit() and len(r) <= 4:
        found = [e for e in chain if e.seq == int(r)]
    elif _HEX_RE.match(r) and len(r) >= MIN_PREFIX:
        found = [e for e in chain if e.id.startswith(r)]
        if r.isdigit():
            found += [e for e in chain if e.seq == int(r) and e not in found]
    else:
        raise UnknownEntryError(f"{ref!r} is not an entry reference: use a sequence number (e.g. 0003), an id "
                                f"prefix of at least {MIN_PREFIX} hex digits, a directory name, or 'base'")
    if len(found) > 1:
        names = ", ".join(f"{e.seq:04d}-{e.id[:16]}" for e in found)
        raise AmbiguousIdError(f"{ref!r} matches {len(found)} entries ({names}); give more characters of the id")
    if not found:
        partial = [n for n in incomplete if n == r or (r.isdigit() and len(r) <= 4 and int(n.split("-")[0]) == int(r))]
        if partial:
            raise UnknownEntryError(f"{ref!r} names an incomplete batch ({', '.join(partial)}): its entry is not "
                                    "committed (pending or interrupted; `dvc repro -P` computes it)")
        span = f"entries 0001–{len(chain):04d}" if chain else "no entries"
        raise UnknownEntryError(f"no committed entry matches {ref!r} (the ledger has {span})")
    return found[0]


def show(ledger_dir: str | Path, ref: str) -> Entry:
    """The committed entry that ``ref`` names (see :func:`resolve_ref`); ``base`` is not an entry."""
    chain = entries(ledger_dir)
    return resolve_ref(chain, ref, allow_base=False, incomplete=incomplete_entries(ledger_dir))


def state_at(chain: list[Entry], states: list[ChainState], upto: str | None) -> tuple[Entry | str, ChainState]:
    """The entry (or ``'base'``) named by ``upto`` and the chain state right after it (default: the last)."""
    if upto is None:
        return (chain[-1], states[-1]) if chain else (BASE, EMPTY)
    t = resolve_ref(chain, upto)
    return (t, EMPTY) if t == BASE else (t, states[next(i for i, e in enumerate(chain) if e is t)])


def dirname_of(ledger_dir: str | Path, ref: str | None) -> str | None:
    """The directory a sequence number or directory name refers to (None for other references), so
    that a reader can stop there instead of reading later entries."""
    if ref is None:
        return None
    r = str(ref).strip().lower()
    if DIR_RE.match(r):
        return r
    if r.isdigit() and len(r) <= 4:
        return next((d.name for d in scan(ledger_dir) if d.seq == int(r)), None)
    return None


def active_chain(ledger_dir: str | Path, upto: str | None = None) -> list[Entry]:
    """The edit entries whose deltas make up the state after ``upto`` (default: now), in order.

    After a fast drop the dropped entry is not listed even though its delta is still added and
    subtracted on replay; :func:`replay_plan` gives the exact operations.
    """
    chain, states = load(ledger_dir)
    by_id = {e.id: e for e in chain}
    return [by_id[i] for i in state_at(chain, states, upto)[1].active]


def replay_plan(ledger_dir: str | Path, upto: str | None = None) -> list[tuple[Entry, int]]:
    """The ``(edit entry, sign)`` operations that rebuild the state after ``upto`` from the base."""
    chain, states = load(ledger_dir)
    by_id = {e.id: e for e in chain}
    return [(by_id[i], s) for i, s in state_at(chain, states, upto)[1].ops]


def pending_drop(ledger_dir: str | Path) -> PendingDrop | None:
    """The unfinished exact drop, if its re-applications are not all committed yet."""
    states = load(ledger_dir, missing_ok=True)[1]
    return states[-1].pending if states else None


__all__ = ["BeforeCheckpointError", "MIN_PREFIX", "active_chain", "dirname_of", "entries", "label", "load", "load_deltas", "load_snapshot", "pending_drop",
           "read_entry", "read_evaluation", "replay_plan", "resolve_ref", "show", "state_at", "walk"]
