"""The ledger state an export holds: which entry, its weights, and its net change from the base.

Both formats start here.  The weights are rebuilt by the ledger's own ``materialize`` (checked bit
for bit against the fingerprint recorded when the state was made), and the net change of every
parameter the history touched is taken from those weights, ``W_state − W_base`` in float64 (exact
for float32 weights), rather than by summing the recorded deltas: the adapter must reproduce the
model ``materialize`` writes, including the rounding of each ``W + Δ`` step and the subtractions
of fast drops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.export.files import ExportError, Provenance
from pipeline.ledger.chain import ChainState
from pipeline.ledger.entry import BASE, Entry
from pipeline.ledger.layout import incomplete_entries
from pipeline.ledger.replay import materialize
from pipeline.ledger.store import load, resolve_ref

HEAD = "head"


@dataclass(frozen=True)
class Target:
    """A resolved reference: the entry and the chain state right after it (no weights yet)."""

    ref: str
    entry: Entry
    state: ChainState
    changed: tuple[str, ...]  # parameters the state's operations touch, sorted

    @property
    def provenance(self) -> Provenance:
        e = self.entry
        return Provenance(e.id, e.dirname, e.base_fingerprint, e.fingerprints["after"]["model"],
                          self.state.approximate)


@dataclass
class ExportState:
    """The edited model and its net change per touched parameter (float64, in the parameter's layout)."""

    target: Target
    model: nn.Module
    changes: dict[str, torch.Tensor]


def resolve(ledger_dir: str | Path, ref: str) -> Target:
    """The committed entry ``ref`` names (``head``: the last one), checked without loading a model.

    ``base`` is refused: it is the unedited model itself (``data/model``), which needs no export.
    """
    r = str(ref).strip().lower()
    if r == BASE:
        raise ExportError("'base' is the unedited model (data/model): there is no edit to export; name an entry "
                          "(a sequence number, id prefix or directory) or 'head'")
    chain, states = load(ledger_dir)
    if r == HEAD:
        if not chain:
            raise ExportError("the ledger has no committed entry: 'head' names nothing (`dvc repro -P` computes the "
                              "added batches)")
        entry, state = chain[-1], states[-1]
    else:
        entry = resolve_ref(chain, r, allow_base=False, incomplete=incomplete_entries(ledger_dir))
        state = states[entry.seq - 1]
    by_id = {e.id: e for e in chain}
    changed = sorted({name for eid, _ in state.ops for name in by_id[eid].delta_params})
    return Target(str(ref), entry, state, tuple(changed))


def build(ledger_dir: str | Path, target: Target, base_model: nn.Module) -> ExportState:
    """Rebuild the target state on a copy of ``base_model`` (left untouched) and take its net change."""
    model = materialize(ledger_dir, target.entry.dirname, base_model)
    base, edited = dict(base_model.named_parameters()), dict(model.named_parameters())
    changes = {n: edited[n].detach().double() - base[n].detach().double() for n in target.changed}
    return ExportState(target, model, changes)
