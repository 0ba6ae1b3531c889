"""Moving a model between ledger states by replaying deltas, and fingerprinting the result.

A :class:`Replayer` wraps a model that starts at the base weights.  Before it first changes a
parameter it keeps a copy of that parameter's base value (a growing
:class:`~pipeline.models.weights.Snapshot`), so it can return to the base bit-exactly (``copy_``)
instead of subtracting, and then replay any operation list.  Going forward along the same history
(the new ops extend the current ones) only applies the new deltas; anything else is a reset to the
base plus a full replay.  ``start_from`` jumps to a checkpoint's state by copying its saved
weights, so that only the operations after it are replayed.  Deltas are added with :func:`pipeline.models.weights.apply_deltas`, the
same code path the editor used, so replay is bit-exact with the recorded fingerprints.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from pipeline.ledger.chain import Op, is_prefix
from pipeline.models.loading import model_fingerprint, weights_fingerprint
from pipeline.models.weights import Snapshot, apply_deltas, set_weights

DeltaLoader = Callable[[str], Mapping[str, torch.Tensor]]


def fingerprint_record(model: nn.Module, names: Iterable[str] | None) -> dict:
    """``{"model": full fingerprint, "params": {"names", "sha256"} over the given parameters}``."""
    rec: dict = {"model": model_fingerprint(model), "params": None}
    if names is not None:
        params = dict(model.named_parameters())
        chosen = sorted(set(names))
        missing = [n for n in chosen if n not in params]
        if missing:
            raise KeyError(f"no parameter(s) {missing} in the model")
        rec["params"] = {"names": chosen, "sha256": weights_fingerprint({n: params[n] for n in chosen})}
    return rec


def check_record(model: nn.Module, record: Mapping | None, *, full: bool = True) -> str | None:
    """None if the model matches a recorded fingerprint record, else what differs.

    ``full=False`` skips the full-model hash (when it is already known to match).
    """
    if record is None:
        return None
    if full and model_fingerprint(model) != record["model"]:
        return "full-model fingerprint differs"
    p = record.get("params")
    if p is not None:
        params = dict(model.named_parameters())
        if any(n not in params for n in p["names"]):
            return "a fingerprinted parameter is missing from the model"
        if weights_fingerprint({n: params[n] for n in p["names"]}) != p["sha256"]:
            return "edited-parameter fingerprint differs"
    return None


class Replayer:
    """Drive ``model`` (which must start at the base weights) through ledger states."""

    def __init__(self, model: nn.Module, load_deltas: DeltaLoader):
        self.model = model
        self._load = load_deltas
        self._base = Snapshot(model)  # base values of every parameter changed so far
        self.ops: tuple[Op, ...] = ()

    def reset(self) -> None:
        self._base.restore()
        self.ops = ()

    def apply(self, op: Op, deltas: Mapping[str, torch.Tensor] | None = None) -> None:
        eid, sign = op
        d = deltas if deltas is not None else self._load(eid)
        self._base.extend(d)  # valid: a parameter not saved yet has never been changed through this replayer
        apply_deltas(self.model, dict(d), sign)
        self.ops = self.ops + (op,)

    def start_from(self, ops: Sequence[Op], weights: Mapping[str, torch.Tensor]) -> None:
        """Be in the state ``ops`` whose edited weights are ``weights`` (a checkpoint's snapshot)."""
        self.reset()
        self._base.extend(weights)  # the base values, saved before they are overwritten
        set_weights(self.model, weights)
        self.ops = tuple(ops)

    def goto(self, ops: Sequence[Op]) -> None:
        ops = tuple(ops)
        if not is_prefix(self.ops, ops):
            self.reset()
        for op in ops[len(self.ops):]:
            self.apply(op)
