"""Which weights are active after each entry: a pure function of the entry sequence.

The state after an entry is an *operation list* ``ops``: the ``(edit id, sign)`` pairs whose deltas,
added (``+1``) or subtracted (``-1``) onto the base model in this order, give that state's weights.
Replaying the same operations in the same order reproduces the weights bit for bit, which a set of
"active batches" alone could not (``(W + a + b) - a`` is not bit-identical to ``W + b``).

Rules (``prev`` is the state before the entry):

* edit ``E``: ``prev.ops + [(E, +1)]``.  Each edit's delta was computed on exactly ``prev``.
  An edit the collapse guard refused leaves the state as it was (``prev``).
* revert to ``T``: the ops of the state after ``T`` (``()`` for the base).
* drop fast ``X``: ``prev.ops + [(X, -1)]`` — approximate.
* checkpoint: ``prev`` unchanged (it must record exactly ``prev.ops``; no drop may be unfinished).
* drop exact ``X``: ``keep`` = the longest leading run of ``+1`` ops whose entries stay active;
  their deltas were computed on exactly that prefix, so they remain exact.  Every other entry that
  stays active is re-computed in order by the edit entries that follow (``reapplies`` = its id);
  until they are all there the state has a :class:`PendingDrop`.

The *active* entries of a state are those with a net ``+1``; they are listed in ``ops`` order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Mapping, Protocol, Sequence

from pipeline.ledger.entry import BASE

Op = tuple[str, int]


class ChainError(ValueError):
    """An entry that does not make sense after the entries before it."""


class EntryLike(Protocol):
    id: str
    kind: str
    target: str | None
    mode: str | None
    reapplies: str | None
    reapply_plan: tuple[str, ...]
    requests: list
    method: str | None
    hparams: dict | None
    refused: bool  # an edit the collapse guard refused (optional on look-alikes: read with getattr)


@dataclass(frozen=True)
class PendingDrop:
    """An exact drop whose later batches are not all re-applied yet."""

    drop_id: str
    target: str
    remaining: tuple[str, ...]  # ids of the original entries still to re-apply, in order


@dataclass(frozen=True)
class ChainState:
    ops: tuple[Op, ...] = ()
    pending: PendingDrop | None = None

    @cached_property  # read for every entry; an ops list is as long as the history
    def active(self) -> tuple[str, ...]:
        net: dict[str, int] = {}
        for eid, sign in self.ops:
            net[eid] = net.get(eid, 0) + sign
        return tuple(eid for eid, n in net.items() if n > 0)

    @property
    def approximate(self) -> bool:
        """True when the weights contain a subtraction (a fast drop) instead of an exact rebuild."""
        return any(sign < 0 for _, sign in self.ops)


EMPTY = ChainState()


def is_prefix(a: Sequence[Op], b: Sequence[Op]) -> bool:
    return len(a) <= len(b) and tuple(b[: len(a)]) == tuple(a)


def exact_drop_plan(state: ChainState, target: str) -> tuple[tuple[Op, ...], tuple[str, ...]]:
    """``(keep ops, ids to re-apply)`` for dropping ``target`` exactly from ``state``."""
    remaining = [eid for eid in state.active if eid != target]
    still = set(remaining)
    keep: list[Op] = []
    for eid, sign in state.ops:
        if sign != 1 or eid not in still:
            break
        keep.append((eid, sign))
    kept = {eid for eid, _ in keep}
    return tuple(keep), tuple(eid for eid in remaining if eid not in kept)


def step(prev: ChainState, entry: EntryLike, states: Mapping[str, ChainState],
         entries: Mapping[str, EntryLike]) -> ChainState:
    """The state after ``entry``; ``states``/``entries`` hold everything before it, by id."""
    if entry.kind == "edit":
        if prev.pending is not None:
            expected = prev.pending.remaining[0]
            if entry.reapplies != expected:
                raise ChainError(f"an exact drop ({prev.pending.drop_id[:12]}) is unfinished: the next entry must "
                                 f"re-apply {expected[:12]}, but this one "
                                 + (f"re-applies {entry.reapplies[:12]}" if entry.reapplies else "is a new batch"))
            original = entries[expected]
            if (entry.requests, entry.method, entry.hparams) != (original.requests, original.method, original.hparams):
                raise ChainError(f"re-application of {expected[:12]} has different requests, method or hparams")
            rest = prev.pending.remaining[1:]
            pending = PendingDrop(prev.pending.drop_id, prev.pending.target, rest) if rest else None
        else:
            if entry.reapplies is not None:
                raise ChainError(f"re-applies {entry.reapplies[:12]} but no exact drop is in progress")
            pending = None
        if getattr(entry, "refused", False):
            return ChainState(prev.ops, pending)
        return ChainState(prev.ops + ((entry.id, 1),), pending)

    if entry.kind == "checkpoint":
        if prev.pending is not None:
            raise ChainError(f"a checkpoint while the exact drop {prev.pending.drop_id[:12]} is unfinished")
        if tuple((eid, sign) for eid, sign in entry.content["state"]) != prev.ops:
            raise ChainError("the checkpoint's recorded state is not the state after its parent")
        return prev

    if entry.kind == "revert":
        if entry.target == BASE:
            return EMPTY
        if entry.target not in states:
            raise ChainError(f"revert target {entry.target[:12]} is not an earlier entry")
        return ChainState(states[entry.target].ops, None)

    if entry.kind == "drop":
        if prev.pending is not None:
            raise ChainError(f"a drop while the exact drop {prev.pending.drop_id[:12]} is unfinished")
        target = entry.target
        if target not in entries or entries[target].kind != "edit":
            raise ChainError(f"drop target {target[:12]} is not an earlier edit entry")
        if target not in prev.active:
            raise ChainError(f"drop target {target[:12]} is not active")
        if entry.mode == "fast":
            return ChainState(prev.ops + ((target, -1),), None)
        keep, plan = exact_drop_plan(prev, target)
        if tuple(entry.reapply_plan) != plan:
            raise ChainError("the recorded re-apply plan differs from the one the chain implies")
        return ChainState(keep, PendingDrop(entry.id, target, plan) if plan else None)

    raise ChainError(f"unknown entry kind {entry.kind!r}")


def resolve(entries: Sequence[EntryLike]) -> list[ChainState]:
    """The state after each entry, in order (raises :class:`ChainError` at the first bad one)."""
    states: dict[str, ChainState] = {}
    by_id: dict[str, EntryLike] = {}
    out: list[ChainState] = []
    prev = EMPTY
    for e in entries:
        prev = step(prev, e, states, by_id)
        states[e.id] = prev
        by_id[e.id] = e
        out.append(prev)
    return out


def who_removed(target_state: ChainState, entries: Sequence[EntryLike], states: Sequence[ChainState],
                start: int) -> EntryLike | None:
    """The first entry at or after ``start`` whose state no longer extends ``target_state``."""
    for e, s in zip(entries[start:], states[start:]):
        if not is_prefix(target_state.ops, s.ops):
            return e
    return None
