"""Appending to the ledger: new batch directories (add-time), and one-call appends for library use.

``add_edit``, ``add_revert`` and ``add_drop`` are what ``editledger add/revert/drop`` do: under
the writer lock, check the request against the ledger, then create the next batch directory(ies)
with their inputs only; DVC's stages compute and commit them.  A revert or drop is planned on the
committed history, so every earlier batch must be committed first.  An exact drop writes the drop
and one re-application batch per later active batch in one go; if that is interrupted between
directories, ``add_drop`` of the same target writes the rest, and nothing else can be added.

``append_edit``, ``append_revert`` and ``append_drop`` add *and* commit in one call, for callers
that computed the deltas themselves (tests, notebooks); they share every check and writer with the
pipeline.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from pipeline.requests import EditRequest, parse_requests
from pipeline.ledger.batch import Batch, StageFile, read_batch, read_requests, write_batch_dir
from pipeline.ledger.chain import EMPTY, ChainState, PendingDrop, exact_drop_plan, is_prefix, who_removed
from pipeline.ledger.commit import check_deltas, commit_drop, commit_edit, commit_revert
from pipeline.ledger.entry import BASE, DROP_MODES, Entry
from pipeline.ledger.errors import (AlreadyRevertedError, BaseMismatchError, EntrySchemaError, LedgerError,
                                    NotActiveError, PendingDropError, StateMismatchError)
from pipeline.ledger import atomic
from pipeline.ledger.layout import DVCIGNORE_FILE, EntryDir, incomplete_entries, last_checkpoint, scan
from pipeline.ledger.lock import LedgerLock
from pipeline.ledger.store import label, load, resolve_ref
from pipeline.models.loading import model_fingerprint

Reapply = Callable[[Entry, nn.Module], Any]  # → dict of deltas, or an object with .deltas (EditResult)


def _as_requests(requests: Iterable[Any]) -> list[EditRequest]:
    """EditRequests, or source records (CounterFact / zsRE / plain dicts) parsed and validated."""
    reqs = list(requests)
    if not reqs:
        raise EntrySchemaError("an edit entry needs at least one request")
    if all(isinstance(r, EditRequest) for r in reqs):
        return reqs
    return parse_requests([r.record if isinstance(r, EditRequest) else r for r in reqs])


def _hparams_dict(hparams: Mapping[str, Any] | Any) -> dict:
    return dict(hparams.to_dict() if hasattr(hparams, "to_dict") else hparams or {})


def _pending_message(p: PendingDrop, chain: list[Entry]) -> str:
    d = next(e for e in chain if e.id == p.drop_id)
    return (f"the exact drop {label(d)} is unfinished ({len(p.remaining)} batch(es) still to re-apply); let "
            "`dvc repro -P` (or append_drop with the same target) finish it first")


def _unfinished_drop(dirs: list[EntryDir]) -> tuple[Batch, list[str]] | None:
    """From batch.yaml alone: an exact drop at the end whose re-application batches are not all written.
    Read from the end, as far as the re-application batches go (not the whole history)."""
    tail: list[Batch] = []
    for d in reversed(dirs):
        tail.insert(0, read_batch(d.path))
        if not (tail[0].kind == "edit" and tail[0].reapplies):
            break
    if not tail or tail[0].kind != "drop" or tail[0].mode != "exact":
        return None
    done, plan = [b.reapplies for b in tail[1:]], list(tail[0].reapply)
    return (tail[0], plan[len(done):]) if len(done) < len(plan) else None


def _committed(ledger: Path, what: str) -> tuple[list[EntryDir], list[Entry], list[ChainState]]:
    """All batches, which must all be committed (a revert or drop is planned on the committed history)."""
    dirs = scan(ledger, missing_ok=True)
    todo = [d.name for d in dirs if not d.committed]
    if todo:
        raise LedgerError(f"{len(todo)} batch(es) are not computed yet (first: {todo[0]}); run `dvc repro -P` "
                          f"before a {what}")
    chain, states = load(ledger, missing_ok=True)
    if not chain:
        raise LedgerError(f"the ledger is empty: nothing to {what}")
    return dirs, chain, states


def _next(dirs: list[EntryDir]) -> tuple[int, str | None]:
    return len(dirs) + 1, dirs[-1].name if dirs else None


def _write_reapplication(ledger: Path, dirs: list[EntryDir], original_dir: str, stage_file: StageFile | None) -> Path:
    orig = Path(ledger) / original_dir
    src = read_batch(orig)
    seq, parent = _next(dirs)
    batch = Batch(seq, "edit", parent, method=src.method, engine=src.engine, seed=src.seed, hparams=src.hparams,
                  reapplies=original_dir)
    path = write_batch_dir(ledger, batch, read_requests(orig), stage_file)
    dirs.append(EntryDir(path.name, path, seq, path.name.split("-", 1)[1]))
    return path


# ------------------------------------------------------------------------------------- add-time

def add_edit(ledger_dir: str | Path, requests: Iterable[Any], method: str, hparams: Mapping[str, Any] | Any, *,
             engine: str = "fast", seed: int = 0, stage_file: StageFile | None = None) -> Path:
    """Write the next batch directory for ``requests`` edited with ``method``; return its path.
    ``stage_file``: how the pipeline computes a batch (its ``dvc.yaml``), for this and every batch
    a call writes."""
    ledger = Path(ledger_dir)
    reqs = _as_requests(requests)
    with LedgerLock(ledger):
        dirs = scan(ledger, missing_ok=True)
        unfinished = _unfinished_drop(dirs)
        if unfinished:
            raise PendingDropError(f"the exact drop of {unfinished[0].target} was interrupted while its "
                                   "re-application batches were written; run `editledger drop` on it again")
        seq, parent = _next(dirs)
        batch = Batch(seq, "edit", parent, method=method, engine=engine, seed=seed, hparams=_hparams_dict(hparams))
        return write_batch_dir(ledger, batch, reqs, stage_file)


def plan_revert(chain: list[Entry], states: list[ChainState], target: str,
                incomplete: Iterable[str] = ()) -> Entry | str:
    """The entry (or ``'base'``) whose state a revert restores, after checking that it can."""
    t = resolve_ref(chain, target, incomplete=incomplete)
    cur = states[-1]
    if t == BASE:
        what, t_state, start = "the base model", EMPTY, 0
    else:
        what, t_state, start = label(t), states[t.seq - 1], t.seq
    if t_state.ops == cur.ops and cur.pending is None:
        raise AlreadyRevertedError(f"the active state already is the state after {what}: nothing to revert")
    if not is_prefix(t_state.ops, cur.ops):
        who = who_removed(t_state, chain, states, start)
        by = f" by {label(who)}" if who else ""
        raise AlreadyRevertedError(f"{what} was already reverted or dropped{by}: it is not in the active history, "
                                   "so its state cannot be reverted to (append its batch again instead)")
    return t


def add_revert(ledger_dir: str | Path, target: str, stage_file: StageFile | None = None) -> Path:
    """Write a revert batch: the active state becomes the state right after ``target`` (or ``'base'``).

    Only states in the active history can be reverted to; :class:`AlreadyRevertedError` when that
    state is already active or was itself reverted or dropped away (re-activating it is a new edit).
    """
    ledger = Path(ledger_dir)
    with LedgerLock(ledger):
        return _add_revert(ledger, target, stage_file)


def _add_revert(ledger: Path, target: str, stage_file: StageFile | None) -> Path:
    dirs, chain, states = _committed(ledger, "revert")
    t = plan_revert(chain, states, target, incomplete_entries(ledger))
    seq, parent = _next(dirs)
    return write_batch_dir(ledger, Batch(seq, "revert", parent, target=BASE if t == BASE else t.dirname),
                           stage_file=stage_file)


def plan_drop(chain: list[Entry], states: list[ChainState], target: str, mode: str,
              incomplete: Iterable[str] = ()) -> tuple[Entry, tuple[str, ...]]:
    """The edit entry to drop and (exact mode) the ids of the later batches to re-apply."""
    if mode not in DROP_MODES:
        raise ValueError(f"drop mode must be one of {DROP_MODES}, got {mode!r}")
    t = resolve_ref(chain, target, allow_base=False, incomplete=incomplete)
    cur = states[-1]
    if cur.pending is not None:
        raise PendingDropError(_pending_message(cur.pending, chain))
    if t.kind != "edit":
        raise LedgerError(f"only edit entries can be dropped; {label(t)} is a {t.kind}")
    if t.refused:
        raise NotActiveError(f"{label(t)} was refused by the collapse guard: it never was active, there is nothing "
                             "to drop")
    if t.id not in cur.active:
        who = next((e for e, s in zip(chain[t.seq:], states[t.seq:]) if t.id not in s.active), None)
        by = f" (removed by {label(who)})" if who else ""
        raise NotActiveError(f"{label(t)} is not active{by}: there is nothing to drop")
    return t, (exact_drop_plan(cur, t.id)[1] if mode == "exact" else ())


def add_drop(ledger_dir: str | Path, target: str, mode: str = "exact", stage_file: StageFile | None = None) -> list[Path]:
    """Write a drop batch (and, exact mode, one re-application batch per later active batch)."""
    ledger = Path(ledger_dir)
    with LedgerLock(ledger):
        return _add_drop(ledger, target, mode, stage_file)


def _add_drop(ledger: Path, target: str, mode: str, stage_file: StageFile | None) -> list[Path]:
    dirs = scan(ledger, missing_ok=True)
    unfinished = _unfinished_drop(dirs)
    if unfinished:
        drop, rest = unfinished
        t = resolve_ref(load(ledger)[0], target, allow_base=False)
        if mode != "exact" or t.dirname != drop.target:
            raise PendingDropError(f"the exact drop of {drop.target} was interrupted while its re-application "
                                   "batches were written; run the same drop again to finish it")
        return [_write_reapplication(ledger, dirs, d, stage_file) for d in rest]
    dirs, chain, states = _committed(ledger, "drop")
    t, plan = plan_drop(chain, states, target, mode, incomplete_entries(ledger))
    by_id = {e.id: e for e in chain}
    originals = [by_id[i].dirname for i in plan]
    seq, parent = _next(dirs)
    path = write_batch_dir(ledger, Batch(seq, "drop", parent, target=t.dirname, mode=mode, reapply=tuple(originals)),
                           stage_file=stage_file)
    dirs.append(EntryDir(path.name, path, seq, path.name.split("-", 1)[1]))
    return [path] + [_write_reapplication(ledger, dirs, d, stage_file) for d in originals]


SEAL_HEADER = ("# Written by editledger: the batch directories a checkpoint seals (numbered below {seq}), hidden from\n"
               "# DVC, which then neither walks nor checks them (docs/LEDGER.md, 'Thousands of batches').  Merged by\n"
               "# union (.gitattributes); `editledger rebase` and `editledger checkpoint` rewrite it.\n")


def write_seal(ledger_dir: str | Path, before_seq: int) -> None:
    """``ledger/.dvcignore``: hide the batch directories numbered below ``before_seq`` (a checkpoint's
    seq on the main line) from DVC.  One file of a few range patterns, so that DVC's walk of the
    ledger does not grow with the history; a function of the main line alone, so two clones with
    one history write the same bytes."""
    from pipeline.ledger.layout import seal_patterns

    atomic.write_text(Path(ledger_dir) / DVCIGNORE_FILE, SEAL_HEADER.format(seq=before_seq)
                      + "".join(f"{p}\n" for p in seal_patterns(before_seq)))


def reseal(ledger_dir: str | Path) -> None:
    """Rewrite ``ledger/.dvcignore`` for the main line as it is: the last computed checkpoint on it
    seals what is before it (none: nothing is sealed).  After a rebase another side's checkpoint may have left
    batches sealed that this line still needs in DVC's pipeline."""
    ck = last_checkpoint(scan(ledger_dir, missing_ok=True))  # a computed one: every batch before it is
    if ck is not None:
        write_seal(ledger_dir, ck.seq)
    elif (Path(ledger_dir) / DVCIGNORE_FILE).exists():
        write_seal(ledger_dir, 1)


def add_checkpoint(ledger_dir: str | Path, stage_file: StageFile | None = None) -> Path:
    """Write a checkpoint batch after the last entry, and seal every batch directory before it
    (:func:`write_seal`): DVC then no longer walks, parses or checks them on every ``dvc repro``
    (they are computed, and their entries are summarised by the checkpoint)."""
    ledger = Path(ledger_dir)
    with LedgerLock(ledger):
        dirs = scan(ledger, missing_ok=True)
        todo = [d.name for d in dirs if not d.committed]
        if todo:
            raise LedgerError(f"{len(todo)} batch(es) are not computed yet (first: {todo[0]}); run `dvc repro -P` "
                              "before a checkpoint")
        chain, states = load(ledger, missing_ok=True, since_checkpoint=True)
        if not chain:
            raise LedgerError("the ledger is empty: nothing to checkpoint")
        if chain[-1].kind == "checkpoint":
            raise LedgerError(f"the last entry, {label(chain[-1])}, already is a checkpoint")
        if states[-1].pending is not None:
            raise PendingDropError(_pending_message(states[-1].pending, chain))
        seq, parent = _next(dirs)
        path = write_batch_dir(ledger, Batch(seq, "checkpoint", parent), stage_file=stage_file)
        write_seal(ledger, seq)
        return path


def batches_since_checkpoint(ledger_dir: str | Path) -> int:
    """How many batch directories follow the last computed checkpoint (all of them if none)."""
    dirs = scan(ledger_dir, missing_ok=True)
    last = last_checkpoint(dirs)
    return len(dirs) - (last.seq if last else 0)


def checkpoint_due(ledger_dir: str | Path, every: int | None) -> bool:
    """Should the next add append a checkpoint first: ``every`` batches follow the last one, all
    computed (a checkpoint is made of committed entries; otherwise the next add tries again)."""
    if every is None:
        return False
    dirs = scan(ledger_dir, missing_ok=True)
    return bool(dirs) and all(d.committed for d in dirs) and batches_since_checkpoint(ledger_dir) >= every


# -------------------------------------------------------------------------------- one-call API

def append_edit(ledger_dir: str | Path, base_fingerprint: str, requests: Iterable[Any], method: str,
                hparams: Mapping[str, Any] | Any, covariance_ids: Mapping[str, str] | None,
                deltas: Mapping[str, torch.Tensor], metrics: Mapping[str, Any] | None = None, *,
                model: nn.Module, timings: Mapping[str, float] | None = None, apply: bool = True,
                engine: str = "fast", seed: int = 0, stage_file: StageFile | None = None,
                keys: Mapping[str, torch.Tensor] | None = None) -> Entry:
    """Add and commit a batch whose ``deltas`` were computed on ``model`` in the current state.

    ``model`` must be in the ledger's active state (checked by fingerprint) and is left edited
    (``apply=True``) or restored.  Every check runs before the directory is written.  If the
    previous call died after writing the directory, a retry with the same batch commits into it.
    """
    ledger = Path(ledger_dir)
    reqs = _as_requests(requests)
    hp = _hparams_dict(hparams)
    deltas = check_deltas(model, deltas)
    with LedgerLock(ledger):
        dirs = scan(ledger, missing_ok=True)
        chain, states = load(ledger, missing_ok=True, since_checkpoint=True)
        n = chain[-1].seq if chain else 0  # committed entries (the chain may start at a checkpoint)
        if chain and chain[0].base_fingerprint != base_fingerprint:
            raise BaseMismatchError(f"this ledger edits the base model {chain[0].base_fingerprint[:16]}…, "
                                    f"not {base_fingerprint[:16]}…")
        if states and states[-1].pending is not None:
            raise PendingDropError(_pending_message(states[-1].pending, chain))
        seq, parent = _next(dirs[:n])
        batch = Batch(seq, "edit", parent, method=method, engine=engine, seed=seed, hparams=hp)
        extra = dirs[n:]
        retry = len(extra) == 1 and extra[0].name == batch.dirname([r.canonical() for r in reqs])
        if extra and not retry:
            raise LedgerError(f"batch {extra[0].name} is not committed yet; compute it (`dvc repro -P`) "
                              "before appending another")
        current = chain[-1].fingerprints["after"]["model"] if chain else base_fingerprint
        if model_fingerprint(model) != current:
            raise StateMismatchError("the model is not in the ledger's active state (its fingerprint differs from "
                                     "the last entry's 'after' fingerprint); materialize the current state first")
        path = dirs[-1].path if retry else write_batch_dir(ledger, batch, reqs, stage_file)
        return commit_edit(path, base_fingerprint=base_fingerprint, covariance_ids=covariance_ids, deltas=deltas,
                           model=model, timings=timings, metrics=metrics, apply=apply, keys=keys)


def append_revert(ledger_dir: str | Path, target: str, *, metrics: Mapping[str, Any] | None = None,
                  stage_file: StageFile | None = None) -> Entry:
    """Add and commit a revert (no model needed: the target state's fingerprints are recorded)."""
    ledger = Path(ledger_dir)
    with LedgerLock(ledger):
        return commit_revert(_add_revert(ledger, target, stage_file), metrics=metrics)


@dataclass
class DropResult:
    """The entries a drop appended (the drop, then any re-applications) and the resulting model."""

    entries: list[Entry]
    model: nn.Module


def _unpack(result: Any) -> tuple[Mapping[str, torch.Tensor], Mapping[str, str] | None, dict, Any, Any]:
    if isinstance(result, Mapping):
        return result, None, {}, None, None
    if not hasattr(result, "deltas"):
        raise LedgerError("the reapply callback must return a dict of deltas or an object with .deltas (EditResult)")
    return (result.deltas, getattr(result, "covariance_ids", None), dict(getattr(result, "timings", None) or {}),
            getattr(result, "metrics", None), getattr(result, "keys", None))


def append_drop(ledger_dir: str | Path, target: str, mode: str = "exact", *, base_model: nn.Module,
                reapply: Reapply | None = None, inplace: bool = False, stage_file: StageFile | None = None) -> DropResult:
    """Add and commit a drop of batch ``target`` (and, exact mode, its re-applications).

    ``reapply(original_entry, model) -> deltas | EditResult`` recomputes a later batch on ``model``,
    which is in the state that batch must be computed on (the callback must not modify it).  If a
    re-application fails, what was committed stays committed, the remaining re-application
    batches stay pending, and calling ``append_drop`` again with the same target resumes.
    ``base_model`` must be the base model (checked by fingerprint); it is copied unless ``inplace``.
    """
    ledger = Path(ledger_dir)
    with LedgerLock(ledger):
        dirs = scan(ledger, missing_ok=True)
        chain, states = load(ledger, missing_ok=True)
        if not chain:
            raise LedgerError("the ledger is empty: nothing to drop")
        incomplete = incomplete_entries(ledger)
        cur = states[-1]
        resume = cur.pending is not None
        if resume:
            t = resolve_ref(chain, target, allow_base=False, incomplete=incomplete)
            if cur.pending.target != t.id or mode != "exact":
                raise PendingDropError(_pending_message(cur.pending, chain))
            plan = cur.pending.remaining
        else:
            if len(dirs) > len(chain):
                raise LedgerError(f"batch {dirs[len(chain)].name} is not committed yet; compute it first")
            t, plan = plan_drop(chain, states, target, mode, incomplete)
        if plan and reapply is None:
            raise ValueError(f"an exact drop of {label(t)} must re-apply {len(plan)} later batch(es): pass "
                             "reapply=callback, or use mode='fast' (approximate)")
        base_fp = chain[0].base_fingerprint
        model = base_model if inplace else copy.deepcopy(base_model)
        if model_fingerprint(model) != base_fp:
            raise BaseMismatchError("base_model is not the ledger's base model (fingerprint differs)")
        new: list[Entry] = []
        if resume:
            from pipeline.ledger.replay import materialize

            materialize(ledger, None, model, inplace=True)
            todo = [d.path for d in dirs[len(chain):]]
        else:
            drop_dir, *todo = _add_drop(ledger, target, mode, stage_file)
            entry, model = commit_drop(drop_dir, model, inplace=True)
            new.append(entry)
        by_dir = {e.dirname: e for e in chain}
        for path in todo:
            original = by_dir[read_batch(path).reapplies]
            t0 = time.perf_counter()
            deltas, cov_ids, timings, metrics, keys = _unpack(reapply(original, model))
            entry = commit_edit(path, base_fingerprint=base_fp,
                                covariance_ids=cov_ids if cov_ids is not None else original.covariance_ids,
                                deltas=deltas, model=model, metrics=metrics, apply=True, keys=keys,
                                timings={**timings, "reapply_s": time.perf_counter() - t0})
            by_dir[entry.dirname] = entry
            new.append(entry)
        return DropResult(new, model)


__all__ = ["DropResult", "add_checkpoint", "add_drop", "add_edit", "add_revert", "batches_since_checkpoint", "checkpoint_due", "reseal", "write_seal", "append_drop", "append_edit", "append_revert",
           "plan_drop", "plan_revert"]
