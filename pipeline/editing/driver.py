"""The one edit driver: targets → spread, pass after pass, iteration after iteration.

A *pass* obtains the target values of some regions on the current weights and spreads them over
those regions' layers (keys are read and the update rule solved layer by layer, lowest first).  A
method with joint optimisation has one pass per iteration; JEEP's "separate optimisation" has one
per region, each on the weights the previous one wrote.  Iterative editing repeats the passes until
its stopping test (:mod:`pipeline.editing.iterate`) is met.

Where the targets come from is the driver's input, not a branch beside it: :class:`Optimise` finds
them (``edit()``, the ``keys_values`` stage), :class:`Replay` returns the ones a ``keys_values``
stage recorded, pass by pass (the ``apply`` stage), so both stages run exactly this loop.

The model is modified in place while the driver runs (keys and current values of a layer must see
the layers written below it); at the end the delta is ``W − W_base`` and the weights are set to
``W_base + Δ``, the state replay reproduces bit for bit, then restored unless ``apply``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from pipeline.editing.hparams import HParams
from pipeline.editing.iterate import IterationTest
from pipeline.editing.methods import Method, Region, sites_of
from pipeline.editing.optimise import ValueResult
from pipeline.editing.spread import spread, written_projections
from pipeline.editing.targets import optimise_targets
from pipeline.models.weights import trial


@dataclass(frozen=True)
class Pass:
    regions: tuple[Region, ...]


def plan(spec: Method, hp: HParams) -> list[Pass]:
    """The passes of one iteration of ``spec`` with ``hp``'s settings."""
    regions = spec.resolve(hp)
    return [Pass(regions)] if spec.joint else [Pass((r,)) for r in regions]


def interleaves(spec: Method, hp: HParams) -> bool:
    """Does finding the targets need spreads (and so the covariances)?  Yes when a pass optimises
    on weights an earlier pass wrote, or the iterative test reads the spread weights."""
    return len(plan(spec, hp)) > 1 or hp.iterative


class Optimise:
    """Targets found by value optimisation on the current weights.  ``anchors`` (site → ``[N]``: the
    norm of each request's value at the site on the unedited model) is what ``norm_anchor`` scales
    the targets to (:func:`anchor_targets`)."""

    def __init__(self, engine: str = "fast", neighbors=None, progress: bool = False,
                 anchors: Mapping[str, torch.Tensor] | None = None):
        self.engine, self.neighbors, self.progress, self.anchors = engine, neighbors, progress, anchors

    def iterations(self, hp: HParams, n_passes: int) -> int:
        return hp.max_iterations if hp.iterative else 1

    def targets(self, ctx: _Context, k: int, j: int, ps: Pass) -> ValueResult:
        values = optimise_targets(ctx.model, ctx.tok, ctx.adapter, ctx.reqs, ctx.prefixes, sites_of(ps.regions), ctx.hp,
                                  self.engine, self.neighbors.prompts if self.neighbors else None, self.progress)
        values.trace = [{**row, "iteration": k, "pass": j} for row in values.trace]
        if ctx.hp.norm_anchor:
            if self.anchors is None:
                raise ValueError("norm_anchor needs the unedited model's value norms (Optimise(anchors=...))")
            values = anchor_targets(values, self.anchors, ctx.hp.norm_anchor_skip)
        return values

    def test(self, ctx: _Context) -> IterationTest | None:
        return IterationTest(ctx.model, ctx.tok, ctx.adapter, ctx.reqs, ctx.hp) if ctx.hp.iterative else None


def anchor_targets(values: ValueResult, anchors: Mapping[str, torch.Tensor], skip: float | None) -> ValueResult:
    """NAS (norm-anchor scaling): every target rescaled to its anchor norm; with ``skip``, a request
    whose optimised target is more than ``skip`` × its anchor keeps its current value (not written)."""
    targets = {}
    for site, z in values.targets.items():
        norm = z.norm(dim=-1, keepdim=True)
        ref = anchors[site].to(z.device, z.dtype)[:, None]
        scaled = z * (ref / norm.clamp(min=1e-12))
        targets[site] = scaled if skip is None else torch.where(norm > skip * ref, values.init[site], scaled)
    return ValueResult(targets, values.init, values.deltas, values.steps, values.trace)


class Replay:
    """The targets a ``keys_values`` stage (or an earlier ``edit()``) recorded, one per pass in order
    (iteration-major): the recorded passes decide how many iterations ran, so there is no stopping
    test.  ``prefixes``: the context prefixes the targets were found with, where the caller of
    ``edit()`` must not regenerate them (they are sampled from the model, which has changed since)."""

    def __init__(self, stored: list[ValueResult], prefixes: list[str] | None = None):
        self.stored, self.prefixes = stored, prefixes

    def iterations(self, hp: HParams, n_passes: int) -> int:
        if len(self.stored) % n_passes:
            raise ValueError(f"{len(self.stored)} recorded passes for a method with {n_passes} per iteration")
        return len(self.stored) // n_passes

    def targets(self, ctx: _Context, k: int, j: int, ps: Pass) -> ValueResult:
        return self.stored[k * ctx.n_passes + j]

    def test(self, ctx: _Context) -> None:
        return None


@dataclass
class _Context:
    model: object
    tok: object
    adapter: object
    reqs: list
    prefixes: list[str]
    hp: HParams
    n_passes: int


@dataclass
class DriveResult:
    values: list[ValueResult]  # one per pass, in order (iteration-major)
    layers: list[dict]  # one row per written (iteration, pass, layer, role)
    deltas: dict[str, torch.Tensor]  # parameter name → W_edited − W_base, in the parameter's layout
    iterations: list[dict] = field(default_factory=list)  # iterative editing: one row per iteration
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # "role@layer" → the batch's keys on the edited model


def drive(model, tok, adapter, reqs, prefixes: list[str], spec: Method, hp: HParams,
          covs: Mapping[tuple[str, int], torch.Tensor], source: Optimise | Replay, *, apply: bool,
          history: Mapping[str, torch.Tensor] | None = None, spectra: Mapping | None = None,
          spread_last: bool = True, timings: dict | None = None) -> DriveResult:
    """Every pass of every iteration of ``spec`` on ``model``.

    ``history``: the update rule's state from earlier edits, and ``spectra`` the covariances'
    eigen-decompositions (:class:`~pipeline.editing.solvers.LayerSystem`); given explicitly, never kept.  ``spread_last=False`` skips the last spread when nothing reads
    the weights after it (the ``keys_values`` stage only needs the targets; then ``deltas`` is empty
    for a method that does not :func:`interleave <interleaves>`).
    """
    timings = timings if timings is not None else {}
    timings.setdefault("values_s", 0.0)
    timings.setdefault("spread_s", 0.0)
    passes = plan(spec, hp)
    ctx = _Context(model, tok, adapter, reqs, prefixes, hp, len(passes))
    names = [adapter.parameter_name(role, layer) for role, layer in written_projections(spec.resolve(hp))]
    result = DriveResult([], [], {})
    test = source.test(ctx)
    n_iter = source.iterations(hp, len(passes))
    spread_any = False
    with trial(model, names) as snapshot:
        for k in range(n_iter):
            if test:
                test.started()
            for j, ps in enumerate(passes):
                t0 = time.perf_counter()
                values = source.targets(ctx, k, j, ps)
                timings["values_s"] += time.perf_counter() - t0
                result.values.append(values)
                last = j == len(passes) - 1
                if test and last:
                    test.optimised(sites_of(ps.regions), values)
                if last and k == n_iter - 1 and not spread_last and not test:
                    break
                t0 = time.perf_counter()
                out = spread(model, tok, adapter, reqs, prefixes, ps.regions, values, covs, hp, history, spectra)
                spread_any = True
                timings["spread_s"] += time.perf_counter() - t0
                result.layers += [{**row, "iteration": k, "pass": j} for row in out.layers]
                result.keys.update(out.keys)
            if test and test.stop():
                break
        result.deltas = snapshot.settle() if spread_any else {}
        if apply:
            snapshot.keep()
    result.iterations = test.rows if test else []
    return result
