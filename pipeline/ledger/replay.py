"""Rebuilding weights from the ledger (``materialize``) and comparing two points in it (``diff``).

``materialize`` replays the operations of a state onto the base model and then checks the result
against the fingerprint recorded when that state was created, so a returned model is guaranteed to
be bit-for-bit the recorded one.  ``diff`` compares two states: which requests are active in one
and not the other, the norm of each side's net weight change per parameter and per layer, and the
change of every recorded metric.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.ledger.atomic import canonical_json
from pipeline.ledger.chain import ChainState, is_prefix
from pipeline.ledger.entry import BASE, Entry
from pipeline.ledger.layout import layer_of
from pipeline.ledger.errors import BaseMismatchError, LedgerCorruptError, UnknownEntryError
from pipeline.ledger.store import dirname_of, load, load_deltas, load_snapshot, read_evaluation, state_at
from pipeline.ledger.weights import Replayer, check_record
from pipeline.models.loading import model_fingerprint


def materialize(ledger_dir: str | Path, upto: str | None, base_model: nn.Module, *, inplace: bool = False,
                check: bool = True) -> nn.Module:
    """The model in the state right after ``upto`` (default: the current state; ``'base'``: none).

    Works on a deep copy of ``base_model`` unless ``inplace``.  With ``check`` (default) the base
    fingerprint is checked first and the result against the recorded 'after' fingerprint.  A
    sequence number or directory name reads the ledger only up to that entry.  A state that
    extends the last checkpoint's starts from its saved weights; any other is rebuilt from the base.
    """
    stop = dirname_of(ledger_dir, upto)
    chain, states = load(ledger_dir, upto=stop, since_checkpoint=True)
    checkpoint = chain[0] if chain and chain[0].kind == "checkpoint" else None
    try:
        target, state = state_at(chain, states, upto)
    except UnknownEntryError:
        if checkpoint is None:
            raise
        checkpoint = None  # it names an entry before the checkpoint
    if checkpoint is not None and not is_prefix(states[0].ops, state.ops):
        checkpoint = None
    if checkpoint is None and chain and chain[0].kind == "checkpoint":
        chain, states = load(ledger_dir, upto=stop)
        target, state = state_at(chain, states, upto)
    model = base_model if inplace else copy.deepcopy(base_model)
    if check and chain and model_fingerprint(model) != chain[0].base_fingerprint:
        raise BaseMismatchError("base_model is not the ledger's base model (fingerprint differs)")
    by_id = {e.id: e for e in chain}
    rep = Replayer(model, lambda eid: load_deltas(by_id[eid]))
    if checkpoint is not None:
        rep.start_from(states[0].ops, load_snapshot(checkpoint))
    rep.goto(state.ops)
    if check and target != BASE:
        why = check_record(model, target.fingerprints["after"])
        if why:
            raise LedgerCorruptError(target.dirname, f"replay does not reproduce the recorded weights: {why}", target.id)
    return model


@dataclass
class Side:
    """One point of a diff."""

    ref: str
    entry_id: str | None
    seq: int | None
    active: list[str]
    requests: list[dict]
    param_norms: dict[str, float]  # Frobenius norm of the net weight change from the base
    layer_norms: dict[str, float]  # the same, combined per layer ("other" for unnumbered names)
    metrics: dict | None  # the evaluation ({"pre", "post"}) if evaluated, else the manifest's metrics
    approximate: bool


@dataclass
class LedgerDiff:
    a: Side
    b: Side
    requests_added: list[dict] = field(default_factory=list)  # active in b, not in a
    requests_removed: list[dict] = field(default_factory=list)  # active in a, not in b
    metric_changes: dict[str, dict] = field(default_factory=dict)  # flat key → {"a", "b", "change"}

    def to_dict(self) -> dict:
        return asdict(self)


def _side(ref: str, target: Entry | str, state: ChainState, by_id: dict[str, Entry]) -> Side:
    net: dict[str, torch.Tensor] = {}
    for eid, sign in state.ops:
        for n, d in load_deltas(by_id[eid]).items():
            net[n] = net.get(n, torch.zeros(d.shape, dtype=torch.float64)) + sign * d.double()
    norms = {n: float(t.norm()) for n, t in sorted(net.items())}
    layers: dict[str, float] = {}
    for n, v in norms.items():
        layers[layer_of(n)] = layers.get(layer_of(n), 0.0) + v * v
    requests = [r for eid in state.active for r in by_id[eid].requests]
    is_entry = isinstance(target, Entry)
    metrics = None
    if is_entry:
        ev = read_evaluation(target)
        metrics = {"pre": ev["pre"], "post": ev["post"]} if ev else target.metrics
    return Side(ref, target.id if is_entry else None, target.seq if is_entry else None, list(state.active), requests,
                norms, {k: v ** 0.5 for k, v in sorted(layers.items())}, metrics, state.approximate)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def diff(ledger_dir: str | Path, a: str, b: str) -> LedgerDiff:
    """Compare the states after ``a`` and ``b`` (references as in :func:`resolve_ref`, or ``'base'``)."""
    chain, states = load(ledger_dir)
    by_id = {e.id: e for e in chain}
    sa = _side(a, *state_at(chain, states, a), by_id)
    sb = _side(b, *state_at(chain, states, b), by_id)
    keys_a = {canonical_json(r) for r in sa.requests}
    keys_b = {canonical_json(r) for r in sb.requests}
    out = LedgerDiff(sa, sb, [r for r in sb.requests if canonical_json(r) not in keys_a],
                     [r for r in sa.requests if canonical_json(r) not in keys_b])
    ma, mb = _flatten(sa.metrics or {}), _flatten(sb.metrics or {})
    for k in sorted(set(ma) | set(mb)):
        va, vb = ma.get(k), mb.get(k)
        if va == vb:
            continue
        row = {"a": va, "b": vb}
        if _is_number(va) and _is_number(vb):
            row["change"] = vb - va
        out.metric_changes[k] = row
    return out
