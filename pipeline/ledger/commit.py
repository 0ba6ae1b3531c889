"""Committing an entry: what the ``apply`` stage writes into a batch directory, and in which order.

``entry.json`` (the hashed content, with ids resolved from the directory references in
``batch.yaml``), then ``keys.safetensors`` and ``deltas.safetensors`` (edits), then ``state.json``, each atomically (temp
file, fsync, rename, directory fsync).  ``state.json`` is the commit point and is written
exclusively: a directory with it is never written again by the tool.  Files of an attempt that
died before its commit point are scratch — never read as an entry — and a rerun replaces them
(``dvc repro`` deletes a stage's outputs before running it anyway).

No ledger lock is taken here: a commit writes only into its own, already existing batch
directory (DVC runs one stage at a time per output, and the exclusive ``state.json`` write
refuses a second commit of the same batch); the lock serialises *adding* directories.
"""

from __future__ import annotations

import copy
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from torch import nn

from pipeline.ledger import atomic
from pipeline.ledger.batch import Batch, read_batch, read_requests
from pipeline.ledger.chain import EMPTY, ChainError, ChainState, exact_drop_plan, step
from pipeline.ledger.entry import (BASE, SCHEMA, STATUS_REFUSED, Entry, build_manifest, checkpoint_content,
                                   content_status, drop_content, edit_content, entry_id, revert_content, seal)
from pipeline.ledger.errors import (BaseMismatchError, LedgerCorruptError, LedgerError, StateMismatchError)
from pipeline.ledger.faults import fault_point
from pipeline.ledger.layout import (DELTAS_FILE, ENTRY_FILE, EVAL_FILE, INDEX_FILE, KEYS_FILE, METRICS_FILE,
                                    RECORDED_FILES, SNAPSHOT_FILE, STATE_FILE)
from pipeline.ledger.replay import materialize
from pipeline.ledger.store import dtype_name, load, load_deltas
from pipeline.ledger.weights import Replayer, fingerprint_record
from pipeline.models.loading import model_fingerprint
from pipeline.models.weights import apply_deltas, trial


@dataclass
class Pending:
    """A batch directory about to be committed, with the committed chain up to its parent."""

    path: Path
    batch: Batch
    chain: list[Entry]
    states: list[ChainState]

    @property
    def parent(self) -> Entry | None:
        return self.chain[-1] if self.chain else None

    @property
    def state(self) -> ChainState:
        return self.states[-1] if self.states else EMPTY

    def base_fingerprint(self, given: str | None = None) -> str:
        """The ledger's base fingerprint (the first entry's); ``given`` must agree with it."""
        if not self.chain:
            if given is None:
                raise LedgerError("the first entry needs the base-model fingerprint")
            return given
        fp = self.chain[0].base_fingerprint
        if given is not None and given != fp:
            raise BaseMismatchError(f"this ledger edits the base model {fp[:16]}…, not {given[:16]}…")
        return fp

    def current_fingerprint(self, base_fp: str) -> str:
        return self.parent.fingerprints["after"]["model"] if self.parent else base_fp

    def entry_in(self, dirname: str) -> Entry:
        """The committed entry in directory ``dirname`` (an earlier batch of this chain)."""
        for e in self.chain:
            if e.dirname == dirname:
                return e
        raise LedgerError(f"{self.path.name}: batch {dirname} is not a committed batch before it")


def open_batch(batch_dir: str | Path) -> Pending:
    """Read ``batch.yaml`` and the chain up to its parent (from the last checkpoint, unless the batch
    refers to an earlier entry by name); refuse an already committed batch."""
    path = Path(batch_dir).resolve()
    if (path / STATE_FILE).exists():
        raise LedgerError(f"{path.name} is already committed; the ledger never rewrites an entry")
    batch = read_batch(path)
    refers = batch.reapplies is not None or batch.kind in ("revert", "drop")
    chain, states = (load(path.parent, upto=batch.parent, since_checkpoint=not refers) if batch.parent else ([], []))
    atomic.remove_stale_temps(path)  # of an attempt that was killed mid-write
    return Pending(path, batch, chain, states)


def _plan(p: Pending, content: dict) -> ChainState:
    """The state after the new entry; structural errors surface before anything is written."""
    provisional = Entry(entry_id(content), p.batch.seq, p.path.name, p.path, content, {}, p.batch)
    try:
        return step(p.state, provisional, {e.id: s for e, s in zip(p.chain, p.states)}, {e.id: e for e in p.chain})
    except ChainError as exc:
        raise LedgerError(f"{p.path.name}: {exc}") from None


def _write_state(path: Path, manifest: dict) -> str:
    """The commit point: ``state.json`` appears atomically, and only after every other file."""
    fault_point("commit:before-state")
    return atomic.write_json(path, manifest, exclusive=True)


def _commit(p: Pending, content: dict, *, fingerprints: dict, deltas: Mapping[str, torch.Tensor] | None = None,
            keys: Mapping[str, torch.Tensor] | None = None, timings: Mapping[str, float] | None = None,
            metrics: Mapping[str, Any] | None = None, outputs: Mapping[str, bytes] | None = None) -> Entry:
    new_state = _plan(p, content)
    t0 = time.perf_counter()
    files = {ENTRY_FILE: atomic.write_json(p.path / ENTRY_FILE, content)}
    for name, data in (outputs or {}).items():  # a checkpoint's snapshot and index
        files[name] = atomic.write_bytes(p.path / name, data)
    if keys:
        files[KEYS_FILE] = atomic.write_safetensors(p.path / KEYS_FILE, {n: k.detach().contiguous().cpu()
                                                                          for n, k in keys.items()})
    delta_info = None
    if deltas is not None:
        files[DELTAS_FILE] = atomic.write_safetensors(p.path / DELTAS_FILE, deltas)
        delta_info = {"file": DELTAS_FILE, "params": {
            n: {"shape": list(d.shape), "dtype": dtype_name(d), "norm": float(d.double().norm())}
            for n, d in sorted(deltas.items())}}
    for name in RECORDED_FILES:
        if (p.path / name).is_file():
            files[name] = atomic.sha256_file(p.path / name)
    manifest = build_manifest(content=content, seq=p.batch.seq, dirname=p.path.name, files=files, deltas=delta_info,
                              fingerprints=fingerprints, approximate=new_state.approximate,
                              active=list(new_state.active),
                              timings={**(timings or {}), "ledger_write_s": time.perf_counter() - t0}, metrics=metrics)
    _write_state(p.path / STATE_FILE, manifest)
    return Entry(manifest["id"], p.batch.seq, p.path.name, p.path, content, manifest, p.batch)


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


def check_finite_after(model: nn.Module, names: Mapping[str, Any], where: str) -> None:
    """Finite deltas can still overflow the weights they are added to (``W + Δ`` = inf): such a
    state would be recorded, replayed bit for bit, and be garbage.  Refuse it before the commit."""
    params = dict(model.named_parameters())
    bad = [n for n in names if not torch.isfinite(params[n]).all()]
    if bad:
        raise LedgerError(f"{where}: adding the deltas makes {', '.join(bad)} non-finite (overflow); the batch is "
                          "not committed and the previous state stays active")


@torch.no_grad()
def commit_edit(batch_dir: str | Path, *, base_fingerprint: str, covariance_ids: Mapping[str, str] | None,
                deltas: Mapping[str, torch.Tensor], model: nn.Module, timings: Mapping[str, float] | None = None,
                metrics: Mapping[str, Any] | None = None, apply: bool = False,
                guard: Mapping[str, Any] | None = None, keys: Mapping[str, torch.Tensor] | None = None) -> Entry:
    """Commit an edit batch whose ``deltas`` were computed on ``model`` in the parent state.

    The model's fingerprint must be the parent's recorded 'after' fingerprint; the deltas are
    added to fingerprint the new state, and the model is left edited (``apply``) or restored.
    ``guard`` is the collapse guard's decision (``{"max_ppl_ratio", "refused"}``, see
    :func:`pipeline.ledger.entry.edit_content`); a refused batch is committed with its deltas
    but leaves the weights (and the recorded 'after' fingerprints) as they were.  ``keys``: the
    batch's keys at every written layer ("role@layer" → ``[N, d_in]``, :mod:`pipeline.editing.history`),
    kept in ``keys.safetensors`` for the update rules of later batches.
    """
    p = open_batch(batch_dir)
    b = p.batch
    if b.kind != "edit":
        raise LedgerError(f"{p.path.name} is a {b.kind} batch, not an edit")
    base_fp = p.base_fingerprint(base_fingerprint)
    deltas = check_deltas(model, deltas)
    reapplies = p.entry_in(b.reapplies).id if b.reapplies else None
    content = edit_content(p.parent.id if p.parent else None, base_fp, read_requests(p.path), b.method, b.hparams,
                           covariance_ids, reapplies, guard)
    refused = content_status(content) == STATUS_REFUSED
    t0 = time.perf_counter()
    before = fingerprint_record(model, deltas)
    if before["model"] != p.current_fingerprint(base_fp):
        raise StateMismatchError(f"{p.path.name}: the model is not in the state after the parent batch (its "
                                 "fingerprint differs from the recorded one)")
    with trial(model, deltas) as snapshot:
        apply_deltas(model, deltas, 1)
        check_finite_after(model, deltas, p.path.name)
        if refused:
            snapshot.restore()
        after = before if refused else fingerprint_record(model, deltas)
        entry = _commit(p, content, fingerprints={"before": before, "after": after}, deltas=deltas, keys=keys,
                        timings={**(timings or {}), "fingerprint_s": time.perf_counter() - t0}, metrics=metrics)
        if apply:
            snapshot.keep()
        return entry


def commit_revert(batch_dir: str | Path, *, metrics: Mapping[str, Any] | None = None) -> Entry:
    """Commit a revert: no weights are computed, the target state's fingerprints are recorded."""
    p = open_batch(batch_dir)
    b = p.batch
    if b.kind != "revert":
        raise LedgerError(f"{p.path.name} is a {b.kind} batch, not a revert")
    base_fp = p.base_fingerprint()
    if b.target == BASE:
        target_id, after = BASE, {"model": base_fp, "params": None}
    else:
        t = p.entry_in(b.target)
        target_id, after = t.id, t.fingerprints["after"]
    content = revert_content(p.parent.id, base_fp, target_id)
    return _commit(p, content, metrics=metrics, fingerprints={"before": p.parent.fingerprints["after"], "after": after})


def commit_drop(batch_dir: str | Path, base_model: nn.Module, *, inplace: bool = False) -> tuple[Entry, nn.Module]:
    """Commit a drop; returns the entry and the model in the new state (a copy unless ``inplace``).

    Fast: the parent state minus the target's delta (approximate).  Exact: the longest prefix of
    the history that does not contain the target; the batches listed in ``reapply`` are then
    recomputed by the re-application batches that follow.
    """
    p = open_batch(batch_dir)
    b = p.batch
    if b.kind != "drop":
        raise LedgerError(f"{p.path.name} is a {b.kind} batch, not a drop")
    base_fp = p.base_fingerprint()
    t = p.entry_in(b.target)
    model = base_model if inplace else copy.deepcopy(base_model)
    if model_fingerprint(model) != base_fp:
        raise BaseMismatchError("base_model is not the ledger's base model (fingerprint differs)")
    by_id = {e.id: e for e in p.chain}
    rep = Replayer(model, lambda eid: load_deltas(by_id[eid]))
    cur = p.state
    t0 = time.perf_counter()
    if b.mode == "fast":
        rep.goto(cur.ops)
        names = list(t.delta_params)
        before = fingerprint_record(model, names)
        if before["model"] != p.current_fingerprint(base_fp):
            raise LedgerCorruptError(p.parent.dirname, "replaying the active chain does not reproduce the recorded "
                                     "weights; run verify --replay", p.parent.id)
        rep.apply((t.id, -1))
        content = drop_content(p.parent.id, base_fp, t.id, "fast")
        after = fingerprint_record(model, names)
    else:
        keep, plan = exact_drop_plan(cur, t.id)
        recorded = tuple(p.entry_in(x).id for x in b.reapply)
        if recorded != plan:
            raise LedgerError(f"{p.path.name}: the batches to re-apply listed in batch.yaml are not the ones the "
                              f"history implies ({', '.join(by_id[i].dirname for i in plan) or 'none'})")
        content = drop_content(p.parent.id, base_fp, t.id, "exact", plan)
        rep.goto(keep)
        names = sorted({n for eid, _ in cur.ops + keep for n in by_id[eid].delta_params})
        before, after = p.parent.fingerprints["after"], fingerprint_record(model, names)
    entry = _commit(p, content, fingerprints={"before": before, "after": after},
                    timings={"rebuild_s": time.perf_counter() - t0})
    return entry, model


def touched_parameters(chain: list[Entry], ops: tuple) -> list[str]:
    """Every parameter the operations change: the deltas' names, and a checkpoint's saved ones."""
    by_id = {e.id: e for e in chain}
    names = set(chain[0].manifest["metrics"]["parameters"]) if chain and chain[0].kind == "checkpoint" else set()
    for eid, _ in ops:
        if eid in by_id:
            names.update(by_id[eid].delta_params)
    return sorted(names)


def commit_checkpoint(batch_dir: str | Path, base_model: nn.Module, index: bytes, *, inplace: bool = False) -> Entry:
    """Commit a checkpoint: rebuild the state after its parent (from the previous checkpoint, checked
    against the parent's recorded fingerprint), save its edited weights (``snapshot.safetensors``)
    and ``index`` (the caller's summary of the batches before it, Parquet bytes)."""
    p = open_batch(batch_dir)
    if p.batch.kind != "checkpoint":
        raise LedgerError(f"{p.path.name} is a {p.batch.kind} batch, not a checkpoint")
    if p.state.pending is not None:
        raise LedgerError(f"{p.path.name}: an exact drop is unfinished; a checkpoint comes after it")
    t0 = time.perf_counter()
    model = materialize(p.path.parent, p.parent.dirname, base_model, inplace=inplace)
    names = touched_parameters(p.chain, p.state.ops)
    record = fingerprint_record(model, names)
    if record["model"] != p.current_fingerprint(p.base_fingerprint()):
        raise LedgerCorruptError(p.parent.dirname, "rebuilding its state does not give the recorded weights; run "
                                 "verify --replay", p.parent.id)
    params = dict(model.named_parameters())
    snapshot = atomic.safetensors_bytes({n: params[n].detach().contiguous().cpu() for n in names})
    content = checkpoint_content(p.parent.id, p.base_fingerprint(), p.batch.seq - 1, p.state.ops)
    return _commit(p, content, fingerprints={"before": record, "after": record},
                   outputs={SNAPSHOT_FILE: snapshot, INDEX_FILE: index}, metrics={"parameters": names},
                   timings={"rebuild_s": time.perf_counter() - t0})


def write_evaluation(entry: Entry, rows: pd.DataFrame, doc: Mapping[str, Any]) -> dict:
    """Write ``eval.parquet`` then ``metrics.json`` (sealed, naming the entry and the Parquet's sha256)."""
    buf = io.BytesIO()
    rows.to_parquet(buf, index=False)
    sha = atomic.write_bytes(entry.path / EVAL_FILE, buf.getvalue())
    sealed = seal({"schema": SCHEMA, "entry": entry.id, "dir": entry.dirname, "files": {EVAL_FILE: sha}, **doc})
    atomic.write_json(entry.path / METRICS_FILE, sealed)
    return sealed


__all__ = ["Pending", "check_deltas", "commit_checkpoint", "touched_parameters", "check_finite_after", "commit_drop", "commit_edit", "commit_revert", "open_batch",
           "write_evaluation"]
