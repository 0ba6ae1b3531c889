"""The on-disk ledger: append-only entry directories, read back as a checked hash chain.

Layout::

    ledger/
      .lock                         writer lock (see lock.py); not an entry
      0001-<id[:12]>/               one directory per entry, <seq:04d>-<first 12 hex of the id>
        entry.json                  the hashed content (canonical JSON; id = sha256 of it)
        deltas.safetensors          edit entries only: parameter name → W_after − W_before
        state.json                  the manifest, written LAST: its presence commits the entry

Commit protocol: make the directory, write ``entry.json``, then ``deltas.safetensors``, then
``state.json``, each atomically (temp file + fsync + rename + directory fsync).  A directory
without ``state.json`` is *incomplete* — an interrupted append.  Readers skip it, it is never
active, and ``verify`` lists it as incomplete, not as corruption.

Retries: nothing is ever rewritten or deleted, and incomplete directories are never reused
(their bytes may be a half-done or different computation; reusing them would need a byte-level
comparison and would blur what happened).  A retry writes a fresh directory: the sequence number is
the position in the committed chain, so a retry of the same batch on the same parent has the same
id and the same name, and gets a numeric suffix: ``0004-<id12>.1``, ``.2``, …  Incomplete
directories stay as inert evidence of the interruption.

Only the holder of the writer lock appends; readers (``entries``, ``show``, ``active_chain``,
``verify``) never lock, because a committed entry appears atomically with its ``state.json``.
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from pipeline.editing.engine import apply_deltas
from pipeline.ledger import atomic
from pipeline.ledger.chain import (EMPTY, ChainError, ChainState, PendingDrop, exact_drop_plan, is_prefix, step,
                                   who_removed)
from pipeline.ledger.entry import (BASE, DROP_MODES, Entry, build_manifest, check_manifest, drop_content,
                                   edit_content, entry_id, revert_content, validate_content)
from pipeline.ledger.errors import (AlreadyRevertedError, AmbiguousIdError, BaseMismatchError, EntrySchemaError,
                                    LedgerCorruptError, LedgerError, LedgerNotFoundError, NotActiveError,
                                    PendingDropError, StateMismatchError, UnknownEntryError)
from pipeline.ledger.lock import LedgerLock
from pipeline.ledger.weights import Replayer, fingerprint_record
from pipeline.models.loading import model_fingerprint

ENTRY_FILE = "entry.json"
DELTAS_FILE = "deltas.safetensors"
STATE_FILE = "state.json"

DIR_RE = re.compile(r"^(?P<seq>\d{4,})-(?P<id>[0-9a-f]{12})(?:\.(?P<attempt>[1-9]\d*))?$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
MIN_PREFIX = 4

Reapply = Callable[[Entry, nn.Module], Any]  # → dict of deltas, or an object with .deltas (EditResult)


# ------------------------------------------------------------------------------------------ layout

@dataclass(frozen=True)
class EntryDir:
    """A directory that looks like an entry; ``committed`` when its ``state.json`` exists."""

    name: str
    path: Path
    seq: int
    id_prefix: str
    attempt: int
    committed: bool


def scan(ledger_dir: str | Path, *, missing_ok: bool = False) -> list[EntryDir]:
    """Entry directories in (seq, attempt) order; other names (``.lock``, temp files) are ignored."""
    root = Path(ledger_dir)
    if not root.is_dir():
        if missing_ok:
            return []
        raise LedgerNotFoundError(f"no ledger at {root}")
    out = []
    for p in root.iterdir():
        m = DIR_RE.match(p.name)
        if m and p.is_dir():
            out.append(EntryDir(p.name, p, int(m["seq"]), m["id"], int(m["attempt"] or 0), (p / STATE_FILE).is_file()))
    return sorted(out, key=lambda d: (d.seq, d.attempt, d.name))


def incomplete_entries(ledger_dir: str | Path) -> list[str]:
    """Names of interrupted (uncommitted) entry directories."""
    return [d.name for d in scan(ledger_dir, missing_ok=True) if not d.committed]


# ----------------------------------------------------------------------------------------- reading

def _read_canonical_json(d: EntryDir, name: str, raw: bytes) -> Any:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerCorruptError(d.name, f"{name} is not valid JSON ({exc})") from None
    try:
        canonical = atomic.canonical_bytes(value)
    except (TypeError, ValueError):
        canonical = None
    if raw != canonical:
        raise LedgerCorruptError(d.name, f"{name} is not in canonical form (modified after writing?)")
    return value


def read_entry(d: EntryDir, *, check_files: bool = False) -> Entry:
    """Read and check one committed entry directory.

    Always: ``state.json`` canonical and sealed by its digest; ``entry.json`` hash as recorded,
    canonical, well-formed and hashing to the entry id; directory name, seq, kind and parent
    consistent.  With ``check_files``: every file in the manifest exists with its recorded sha256
    and the deltas hold exactly the recorded tensors (names, shapes, dtypes).
    """
    try:
        raw_state = (d.path / STATE_FILE).read_bytes()
    except OSError as exc:
        raise LedgerCorruptError(d.name, f"cannot read {STATE_FILE}: {exc}") from None
    manifest = _read_canonical_json(d, STATE_FILE, raw_state)
    try:
        check_manifest(manifest)
    except EntrySchemaError as exc:
        raise LedgerCorruptError(d.name, f"{STATE_FILE}: {exc}") from None
    eid = manifest["id"]

    def bad(reason: str) -> LedgerCorruptError:
        return LedgerCorruptError(d.name, reason, eid)

    if eid[:12] != d.id_prefix:
        raise bad("the directory name does not match the entry id in state.json")
    if manifest["seq"] != d.seq:
        raise bad(f"state.json says seq {manifest['seq']}, the directory name says {d.seq}")
    try:
        raw_entry = (d.path / ENTRY_FILE).read_bytes()
    except OSError as exc:
        raise bad(f"cannot read {ENTRY_FILE}: {exc}") from None
    if atomic.sha256_bytes(raw_entry) != manifest["files"][ENTRY_FILE]:
        raise bad(f"{ENTRY_FILE} does not match its sha256 in the manifest")
    content = _read_canonical_json(d, ENTRY_FILE, raw_entry)
    try:
        validate_content(content)
    except EntrySchemaError as exc:
        raise bad(f"{ENTRY_FILE}: {exc}") from None
    if entry_id(content) != eid:
        raise bad(f"{ENTRY_FILE} does not hash to the entry id")
    if manifest["kind"] != content["kind"] or manifest["parent"] != content["parent"]:
        raise bad("state.json kind/parent differ from entry.json")
    has_deltas = content["kind"] == "edit"
    if has_deltas != (manifest["deltas"] is not None) or has_deltas != (DELTAS_FILE in manifest["files"]):
        raise bad("deltas are recorded for a non-edit entry or missing for an edit entry")
    entry = Entry(eid, d.seq, d.name, d.path, content, manifest)
    if check_files:
        for name, sha in manifest["files"].items():
            if name == ENTRY_FILE:
                continue
            try:
                data = (d.path / name).read_bytes()
            except OSError as exc:
                raise bad(f"cannot read {name}: {exc}") from None
            if atomic.sha256_bytes(data) != sha:
                raise bad(f"{name} does not match its sha256 in the manifest")
            if name == DELTAS_FILE:
                _check_delta_tensors(entry, atomic.load_safetensors_bytes(data))
    return entry


def _check_delta_tensors(entry: Entry, tensors: Mapping[str, torch.Tensor]) -> None:
    spec = entry.delta_params
    if set(tensors) != set(spec):
        raise LedgerCorruptError(entry.dirname, "deltas hold other parameters than the manifest lists", entry.id)
    for n, t in tensors.items():
        if list(t.shape) != spec[n]["shape"] or _dtype_name(t) != spec[n]["dtype"]:
            raise LedgerCorruptError(entry.dirname, f"delta {n} has another shape/dtype than recorded", entry.id)


def load_deltas(entry: Entry) -> dict[str, torch.Tensor]:
    """The deltas of an edit entry, after checking the file against the manifest's sha256."""
    if entry.kind != "edit":
        raise LedgerError(f"entry {entry.seq:04d} ({entry.short}) is a {entry.kind}; only edits have deltas")
    data = (entry.path / DELTAS_FILE).read_bytes()
    if atomic.sha256_bytes(data) != entry.manifest["files"][DELTAS_FILE]:
        raise LedgerCorruptError(entry.dirname, f"{DELTAS_FILE} does not match its sha256 in the manifest", entry.id)
    tensors = atomic.load_safetensors_bytes(data)
    _check_delta_tensors(entry, tensors)
    return tensors


def walk(ledger_dir: str | Path, *, check_files: bool = False,
         missing_ok: bool = False) -> Iterator[tuple[Entry, ChainState]]:
    """Yield ``(entry, state after it)`` for committed entries in order, checking the chain.

    Raises :class:`LedgerCorruptError` at the first entry that fails: unreadable or modified files,
    a gap or duplicate in the sequence, a wrong parent, another base model, fingerprints that do
    not connect to the previous entry, or a structurally impossible revert/drop.
    """
    states: dict[str, ChainState] = {}
    by_id: dict[str, Entry] = {}
    prev: Entry | None = None
    first: Entry | None = None
    state = EMPTY
    for pos, d in enumerate((d for d in scan(ledger_dir, missing_ok=missing_ok) if d.committed), 1):
        e = read_entry(d, check_files=check_files)

        def bad(reason: str) -> LedgerCorruptError:
            return LedgerCorruptError(d.name, reason, e.id)

        if e.seq != pos:
            raise bad(f"sequence number {e.seq} where {pos} was expected (an entry is missing or duplicated)")
        if e.parent != (prev.id if prev else None):
            raise bad("its parent is not the previous entry's id (the hash chain is broken)")
        first = first or e
        if e.base_fingerprint != first.base_fingerprint:
            raise bad("its base-model fingerprint differs from the first entry's")
        before_fp = prev.fingerprints["after"]["model"] if prev else e.base_fingerprint
        if e.fingerprints["before"]["model"] != before_fp:
            raise bad("its 'before' weight fingerprint is not the previous state's")
        try:
            state = step(state, e, states, by_id)
        except ChainError as exc:
            raise bad(str(exc)) from None
        if e.kind == "revert":
            target_fp = e.base_fingerprint if e.target == BASE else by_id[e.target].fingerprints["after"]["model"]
            if e.fingerprints["after"]["model"] != target_fp:
                raise bad("its 'after' fingerprint is not the fingerprint of the state it reverts to")
        if e.active != list(state.active) or e.approximate != state.approximate:
            raise bad("the recorded active entries / approximate flag differ from what the chain implies")
        states[e.id] = state
        by_id[e.id] = e
        prev = e
        yield e, state


def load(ledger_dir: str | Path, *, missing_ok: bool = False) -> tuple[list[Entry], list[ChainState]]:
    chain, states = [], []
    for e, s in walk(ledger_dir, missing_ok=missing_ok):
        chain.append(e)
        states.append(s)
    return chain, states


def entries(ledger_dir: str | Path) -> list[Entry]:
    """Committed entries in order, with files, ids and the parent chain checked (not the deltas' bytes)."""
    return load(ledger_dir)[0]


def _label(e: Entry) -> str:
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
        partial = [n for n in incomplete if n.startswith(r) or DIR_RE.match(n)["id"].startswith(r)]
        if partial:
            raise UnknownEntryError(f"{ref!r} names an incomplete (interrupted) entry ({', '.join(partial)}); "
                                    "it was never committed and is not part of the ledger")
        span = f"entries 0001–{len(chain):04d}" if chain else "no entries"
        raise UnknownEntryError(f"no committed entry matches {ref!r} (the ledger has {span})")
    return found[0]


def show(ledger_dir: str | Path, ref: str) -> Entry:
    """The committed entry that ``ref`` names (see :func:`resolve_ref`); ``base`` is not an entry."""
    chain = entries(ledger_dir)
    return resolve_ref(chain, ref, allow_base=False, incomplete=incomplete_entries(ledger_dir))


def _state_at(chain: list[Entry], states: list[ChainState], upto: str | None) -> ChainState:
    if upto is None:
        return states[-1] if states else EMPTY
    t = resolve_ref(chain, upto)
    return EMPTY if t == BASE else states[t.seq - 1]


def active_chain(ledger_dir: str | Path, upto: str | None = None) -> list[Entry]:
    """The edit entries whose deltas make up the state after ``upto`` (default: now), in order.

    After a fast drop the dropped entry is not listed even though its delta is still added and
    subtracted on replay; :func:`replay_plan` gives the exact operations.
    """
    chain, states = load(ledger_dir)
    by_id = {e.id: e for e in chain}
    return [by_id[i] for i in _state_at(chain, states, upto).active]


def replay_plan(ledger_dir: str | Path, upto: str | None = None) -> list[tuple[Entry, int]]:
    """The ``(edit entry, sign)`` operations that rebuild the state after ``upto`` from the base."""
    chain, states = load(ledger_dir)
    by_id = {e.id: e for e in chain}
    return [(by_id[i], s) for i, s in _state_at(chain, states, upto).ops]


def pending_drop(ledger_dir: str | Path) -> PendingDrop | None:
    """The unfinished exact drop, if the last one was interrupted before all re-applications."""
    states = load(ledger_dir, missing_ok=True)[1]
    return states[-1].pending if states else None


# ----------------------------------------------------------------------------------------- writing

def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def check_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reject deltas that could not be replayed: empty, unknown names, wrong shapes, non-finite."""
    if not isinstance(deltas, Mapping) or not deltas:
        raise LedgerError("an edit entry needs a non-empty mapping of parameter name → delta tensor")
    params = dict(model.named_parameters())
    out = {}
    for name, d in deltas.items():
        if name not in params:
            raise LedgerError(f"delta for unknown parameter {name!r}")
        if not isinstance(d, torch.Tensor) or not d.is_floating_point():
            raise LedgerError(f"delta for {name} must be a floating-point tensor")
        if tuple(d.shape) != tuple(params[name].shape):
            raise LedgerError(f"delta for {name} has shape {tuple(d.shape)}, the parameter {tuple(params[name].shape)}")
        if not torch.isfinite(d).all():
            raise LedgerError(f"delta for {name} has non-finite values")
        out[name] = d.detach()
    return out


def _plan(chain: list[Entry], states: list[ChainState], content: dict) -> tuple[str, Entry, ChainState]:
    """Id and resulting state of a new entry; structural errors surface before anything is written."""
    eid = entry_id(content)
    provisional = Entry(eid, len(chain) + 1, "", Path(), content, {})
    try:
        new_state = step(states[-1] if states else EMPTY, provisional, {e.id: s for e, s in zip(chain, states)},
                         {e.id: e for e in chain})
    except ChainError as exc:
        raise LedgerError(str(exc)) from None
    return eid, provisional, new_state


def _new_entry_dir(ledger_dir: Path, seq: int, eid: str) -> Path:
    base = f"{seq:04d}-{eid[:12]}"
    name, attempt = base, 0
    while (ledger_dir / name).exists():  # an interrupted earlier attempt: keep it, write beside it
        attempt += 1
        name = f"{base}.{attempt}"
    return atomic.make_dir(ledger_dir / name)


def _write_state(path: Path, manifest: dict) -> str:
    """The commit point: ``state.json`` appears atomically, and only after every other file."""
    return atomic.write_json(path, manifest, exclusive=True)


def _commit(ledger_dir: Path, seq: int, content: dict, new_state: ChainState, *, fingerprints: dict,
            deltas: Mapping[str, torch.Tensor] | None = None, timings: Mapping[str, float] | None = None,
            metrics: Mapping[str, Any] | None = None) -> Entry:
    t0 = time.perf_counter()
    eid = entry_id(content)
    path = _new_entry_dir(ledger_dir, seq, eid)
    files = {ENTRY_FILE: atomic.write_json(path / ENTRY_FILE, content, exclusive=True)}
    delta_info = None
    if deltas is not None:
        files[DELTAS_FILE] = atomic.write_safetensors(path / DELTAS_FILE, deltas, exclusive=True)
        delta_info = {"file": DELTAS_FILE, "params": {
            n: {"shape": list(d.shape), "dtype": _dtype_name(d), "norm": float(d.double().norm())}
            for n, d in sorted(deltas.items())}}
    manifest = build_manifest(content=content, seq=seq, files=files, deltas=delta_info, fingerprints=fingerprints,
                              approximate=new_state.approximate, active=list(new_state.active),
                              timings={**(timings or {}), "ledger_write_s": time.perf_counter() - t0}, metrics=metrics)
    _write_state(path / STATE_FILE, manifest)
    return Entry(eid, seq, path.name, path, content, manifest)


def _current_fp(chain: list[Entry], base_fingerprint: str) -> str:
    return chain[-1].fingerprints["after"]["model"] if chain else base_fingerprint


@torch.no_grad()
def _write_edit(ledger_dir: Path, chain: list[Entry], states: list[ChainState], content: dict,
                deltas: dict[str, torch.Tensor], model: nn.Module, *, timings: Mapping[str, float] | None,
                metrics: Mapping[str, Any] | None, apply: bool) -> tuple[Entry, ChainState]:
    """Fingerprint, apply, commit; on any failure the model's touched parameters are restored."""
    eid, _, new_state = _plan(chain, states, content)
    t0 = time.perf_counter()
    before = fingerprint_record(model, deltas)
    expected = _current_fp(chain, content["base_fingerprint"])
    if before["model"] != expected:
        raise StateMismatchError("the model is not in the ledger's active state (its fingerprint differs from the "
                                 "last entry's 'after' fingerprint); materialize the current state first")
    params = dict(model.named_parameters())
    originals = {n: params[n].detach().clone() for n in deltas}
    keep = False
    try:
        apply_deltas(model, deltas, 1)
        after = fingerprint_record(model, deltas)
        t = {**(timings or {}), "fingerprint_s": time.perf_counter() - t0}
        entry = _commit(ledger_dir, len(chain) + 1, content, new_state, fingerprints={"before": before, "after": after},
                        deltas=deltas, timings=t, metrics=metrics)
        keep = apply
        return entry, new_state
    finally:
        if not keep:
            for n, value in originals.items():
                params[n].copy_(value)


def _check_base(chain: list[Entry], base_fingerprint: str) -> None:
    if chain and chain[0].base_fingerprint != base_fingerprint:
        raise BaseMismatchError(f"this ledger edits the base model {chain[0].base_fingerprint[:16]}…, "
                                f"not {base_fingerprint[:16]}…")


def _pending_message(p: PendingDrop, chain: list[Entry]) -> str:
    d = next(e for e in chain if e.id == p.drop_id)
    return (f"the exact drop {_label(d)} is unfinished ({len(p.remaining)} batch(es) still to re-apply); rerun "
            f"append_drop(..., '{p.target[:12]}', mode='exact') to finish it, or revert")


def append_edit(ledger_dir: str | Path, base_fingerprint: str, requests: Iterable[Any], method: str,
                hparams: Mapping[str, Any] | Any, covariance_ids: Mapping[str, str] | None,
                deltas: Mapping[str, torch.Tensor], metrics: Mapping[str, Any] | None = None, *,
                model: nn.Module, timings: Mapping[str, float] | None = None, apply: bool = True) -> Entry:
    """Append a batch of edits whose ``deltas`` were computed on ``model`` in the current state.

    ``model`` must be in the ledger's active state (checked by fingerprint); the deltas are added to
    it to fingerprint the new state, and it is left edited (``apply=True``) or restored.  The entry
    is committed when this returns; if anything fails, the model is restored and the ledger is
    unchanged apart from an inert incomplete directory.
    """
    ledger_dir = Path(ledger_dir)
    deltas = check_deltas(model, deltas)
    with LedgerLock(ledger_dir):
        chain, states = load(ledger_dir, missing_ok=True)
        if states and states[-1].pending is not None:
            raise PendingDropError(_pending_message(states[-1].pending, chain))
        _check_base(chain, base_fingerprint)
        content = edit_content(chain[-1].id if chain else None, base_fingerprint, requests, method, hparams,
                               covariance_ids)
        entry, _ = _write_edit(ledger_dir, chain, states, content, deltas, model, timings=timings, metrics=metrics,
                               apply=apply)
        return entry


def append_revert(ledger_dir: str | Path, target: str, *, metrics: Mapping[str, Any] | None = None) -> Entry:
    """Append a revert: the active state becomes the state right after ``target`` (or ``'base'``).

    Only states in the active history can be reverted to.  Raises :class:`AlreadyRevertedError`
    when that state is already active, or when ``target`` was itself reverted or dropped away
    (re-activating it is a new edit, not a revert).  No model is needed: the new state is an
    earlier one, whose fingerprints are already recorded.
    """
    ledger_dir = Path(ledger_dir)
    with LedgerLock(ledger_dir):
        chain, states = load(ledger_dir)
        if not chain:
            raise LedgerError("the ledger is empty: nothing to revert")
        t = resolve_ref(chain, target, incomplete=incomplete_entries(ledger_dir))
        cur = states[-1]
        base_fp = chain[0].base_fingerprint
        if t == BASE:
            label, t_state, after, start = "the base model", EMPTY, {"model": base_fp, "params": None}, 0
        else:
            label, t_state, after, start = _label(t), states[t.seq - 1], t.fingerprints["after"], t.seq
        if t_state.ops == cur.ops and cur.pending is None:
            raise AlreadyRevertedError(f"the active state already is the state after {label}: nothing to revert")
        if not is_prefix(t_state.ops, cur.ops):
            who = who_removed(t_state, chain, states, start)
            by = f" by {_label(who)}" if who else ""
            raise AlreadyRevertedError(f"{label} was already reverted or dropped{by}: it is not in the active "
                                       "history, so its state cannot be reverted to (append its batch again instead)")
        content = revert_content(chain[-1].id, base_fp, BASE if t == BASE else t.id)
        _, _, new_state = _plan(chain, states, content)
        return _commit(ledger_dir, len(chain) + 1, content, new_state, metrics=metrics,
                       fingerprints={"before": chain[-1].fingerprints["after"], "after": after})


@dataclass
class DropResult:
    """The entries a drop appended (the drop, then any re-applications) and the resulting model."""

    entries: list[Entry]
    model: nn.Module


def _unpack(result: Any) -> tuple[Mapping[str, torch.Tensor], Mapping[str, str] | None, dict, Any]:
    if isinstance(result, Mapping):
        return result, None, {}, None
    if not hasattr(result, "deltas"):
        raise LedgerError("the reapply callback must return a dict of deltas or an object with .deltas (EditResult)")
    return (result.deltas, getattr(result, "covariance_ids", None), dict(getattr(result, "timings", None) or {}),
            getattr(result, "metrics", None))


def append_drop(ledger_dir: str | Path, target: str, mode: str = "exact", *, base_model: nn.Module,
                reapply: Reapply | None = None, inplace: bool = False) -> DropResult:
    """Remove batch ``target`` from the active state.

    ``mode="exact"`` resets to the history before the batch and recomputes every later active batch
    with ``reapply(original_entry, model) -> deltas | EditResult`` on the new state (``model`` is in
    the state the batch must be computed on; the callback must not modify it — e.g.
    ``lambda e, m: pipeline.edit(m, tok, e.requests, e.method, e.hparams)``).  Each recomputation is
    a new edit entry whose ``reapplies`` names the original.  If a re-application fails, the drop
    and the re-applications done so far stay committed and the ledger records the drop as
    unfinished; calling ``append_drop`` again with the same target resumes it.

    ``mode="fast"`` subtracts the batch's recorded delta from the current weights; the entry and
    every later state are marked ``approximate``.

    ``base_model`` must be the base model (checked by fingerprint); it is copied unless ``inplace``.
    Returns the new entries and the model in the new state.
    """
    if mode not in DROP_MODES:
        raise ValueError(f"drop mode must be one of {DROP_MODES}, got {mode!r}")
    ledger_dir = Path(ledger_dir)
    with LedgerLock(ledger_dir):
        chain, states = load(ledger_dir)
        if not chain:
            raise LedgerError("the ledger is empty: nothing to drop")
        t = resolve_ref(chain, target, allow_base=False, incomplete=incomplete_entries(ledger_dir))
        cur = states[-1]
        by_id = {e.id: e for e in chain}
        resume = False
        if cur.pending is not None:
            if cur.pending.target != t.id or mode != "exact":
                raise PendingDropError(_pending_message(cur.pending, chain))
            resume = True
        elif t.kind != "edit":
            raise LedgerError(f"only edit entries can be dropped; {_label(t)} is a {t.kind}")
        elif t.id not in cur.active:
            who = next((e for e, s in zip(chain[t.seq:], states[t.seq:]) if t.id not in s.active), None)
            by = f" (removed by {_label(who)})" if who else ""
            raise NotActiveError(f"{_label(t)} is not active{by}: there is nothing to drop")
        if mode == "exact":
            plan = cur.pending.remaining if resume else exact_drop_plan(cur, t.id)[1]
            if plan and reapply is None:
                raise ValueError(f"an exact drop of {_label(t)} must re-apply {len(plan)} later batch(es): pass "
                                 "reapply=callback, or use mode='fast' (approximate)")

        base_fp = chain[0].base_fingerprint
        model = base_model if inplace else copy.deepcopy(base_model)
        if model_fingerprint(model) != base_fp:
            raise BaseMismatchError("base_model is not the ledger's base model (fingerprint differs)")
        rep = Replayer(model, lambda eid: load_deltas(by_id[eid]))
        new: list[Entry] = []

        if mode == "fast":
            rep.goto(cur.ops)
            names = list(t.delta_params)
            before = fingerprint_record(model, names)
            if before["model"] != _current_fp(chain, base_fp):
                raise LedgerCorruptError(chain[-1].dirname, "replaying the active chain does not reproduce the "
                                         "recorded weights; run verify --replay", chain[-1].id)
            rep.apply((t.id, -1))
            content = drop_content(chain[-1].id, base_fp, t.id, "fast")
            _, _, new_state = _plan(chain, states, content)
            entry = _commit(ledger_dir, len(chain) + 1, content, new_state,
                            fingerprints={"before": before, "after": fingerprint_record(model, names)})
            return DropResult([entry], model)

        if resume:
            rep.goto(cur.ops)
            remaining = cur.pending.remaining
        else:
            keep, remaining = exact_drop_plan(cur, t.id)
            content = drop_content(chain[-1].id, base_fp, t.id, "exact", remaining)
            _, _, new_state = _plan(chain, states, content)
            t0 = time.perf_counter()
            rep.goto(keep)
            names = sorted({n for eid, _ in cur.ops + keep for n in by_id[eid].delta_params})
            after = fingerprint_record(model, names)
            entry = _commit(ledger_dir, len(chain) + 1, content, new_state,
                            timings={"rebuild_s": time.perf_counter() - t0},
                            fingerprints={"before": chain[-1].fingerprints["after"], "after": after})
            chain.append(entry)
            states.append(new_state)
            new.append(entry)
        for rid in remaining:
            original = by_id[rid]
            t0 = time.perf_counter()
            deltas, cov_ids, timings, metrics = _unpack(reapply(original, model))
            timings = {**timings, "reapply_s": time.perf_counter() - t0}
            deltas = check_deltas(model, deltas)
            content = edit_content(chain[-1].id, base_fp, original.requests, original.method, original.hparams,
                                   cov_ids if cov_ids is not None else original.covariance_ids, reapplies=rid)
            rep.protect(deltas)
            entry, new_state = _write_edit(ledger_dir, chain, states, content, deltas, model, timings=timings,
                                           metrics=metrics, apply=True)
            rep.ops = rep.ops + ((entry.id, 1),)
            chain.append(entry)
            states.append(new_state)
            by_id[entry.id] = entry
            new.append(entry)
        return DropResult(new, model)


__all__ = [
    "DELTAS_FILE", "ENTRY_FILE", "STATE_FILE", "DropResult", "EntryDir", "active_chain", "append_drop", "append_edit",
    "append_revert", "check_deltas", "entries", "incomplete_entries", "load", "load_deltas", "pending_drop",
    "read_entry", "replay_plan", "resolve_ref", "scan", "show", "walk",
]
