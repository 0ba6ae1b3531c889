"""Changing a model's weights in place, and putting them back bit for bit.

Everything that edits weights goes through here: the editor writing a batch, the ledger adding a
recorded delta, the collapse guard trying a batch out, replay moving between states.  Two rules
keep the ledger exact:

* a state is ``W_base + Δ`` computed by :func:`apply_deltas`, the one addition replay also uses;
* going back is a copy of the saved values (:class:`Snapshot`), never a subtraction:
  ``(W + Δ) − Δ`` is not ``W`` in floating point.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


@torch.no_grad()
def apply_deltas(model: nn.Module, deltas: Mapping[str, torch.Tensor], sign: int = 1) -> None:
    """Add (``sign=1``) or subtract recorded deltas in place; ``W + Δ`` is exactly the edited state."""
    params = dict(model.named_parameters())
    for name, d in deltas.items():
        if name not in params:
            raise KeyError(f"delta for unknown parameter {name!r}")
        p = params[name]
        if p.shape != d.shape:
            raise ValueError(f"delta for {name} has shape {tuple(d.shape)}, parameter has {tuple(p.shape)}")
        p.add_(d.to(p.device, p.dtype), alpha=sign)


@torch.no_grad()
def set_weights(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy saved values into parameters (a ledger checkpoint's weights): bit for bit, no arithmetic."""
    params = dict(model.named_parameters())
    for name, w in weights.items():
        if name not in params or params[name].shape != w.shape or params[name].dtype != w.dtype:
            raise ValueError(f"saved weight {name} does not fit the model (name, shape or dtype)")
        params[name].copy_(w.to(params[name].device))


class Snapshot:
    """Saved copies of some of a model's parameters, to return to them bit for bit.

    ``extend`` saves more parameters later (the first value seen is kept), so a snapshot can grow
    with what a sequence of operations touches, as replay does.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] = ()):
        self._params = dict(model.named_parameters())
        self.saved: dict[str, torch.Tensor] = {}
        self.kept = False
        self.extend(names)

    @torch.no_grad()
    def extend(self, names: Iterable[str]) -> None:
        for n in names:
            if n not in self.saved:
                if n not in self._params:
                    raise KeyError(f"unknown parameter {n!r}")
                self.saved[n] = self._params[n].detach().clone()

    @torch.no_grad()
    def restore(self) -> None:
        for n, value in self.saved.items():
            self._params[n].copy_(value)

    @torch.no_grad()
    def settle(self) -> dict[str, torch.Tensor]:
        """``Δ = W − W_saved`` (on the CPU) for every saved parameter, and ``W := W_saved + Δ``: the
        state a replay of ``Δ`` reproduces, which may differ from ``W`` in the last bit."""
        deltas = {}
        for n, base in self.saved.items():
            p = self._params[n]
            deltas[n] = (p.detach() - base).cpu()
            p.copy_(base + deltas[n].to(p.device))
        return deltas

    def keep(self) -> None:
        """Within :func:`trial`: leave the weights as they are at the end."""
        self.kept = True


@contextmanager
def trial(model: nn.Module, names: Iterable[str]) -> Iterator[Snapshot]:
    """Change the parameters ``names`` inside the block; they are restored at its end (also on an
    error) unless ``keep()`` was called on the yielded snapshot."""
    snap = Snapshot(model, names)
    try:
        yield snap
    except BaseException:
        snap.kept = False
        raise
    finally:
        if not snap.kept:
            snap.restore()
