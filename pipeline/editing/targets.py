"""The target value of every request at every site of some regions, on the current weights.

The fast engine optimises the whole batch at once (:class:`~pipeline.editing.forward.PrefixCachedForward`),
on a CPU split over forked single-threaded workers (:mod:`pipeline.editing.workers`); the
reference engine optimises one request at a time through full forwards (the public code's loop,
kept as the oracle).  With ``v_dtype`` other than the model's, δ is found on a cast copy and the
target is the model's own value plus δ, so the spread does not also write the cast's rounding
error into the weights.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from pipeline.editing.forward import FullForward, PrefixCachedForward
from pipeline.editing.hparams import HParams
from pipeline.editing.keys import site_values
from pipeline.editing.methods import Site
from pipeline.editing.optimise import OptimisationError, ValueResult, optimise_values
from pipeline.editing.precision import working_copy
from pipeline.editing.problem import ValueProblem
from pipeline.editing.workers import available_workers, fork_map
from pipeline.models.attention import attention_implementation

ENGINES = ("fast", "reference")


def site_dims(model, adapter, sites: tuple[Site, ...]) -> dict[str, int]:
    """Width of each site's vector (residual sites: the hidden size; others: the projection's output)."""
    hidden = model.config.get_text_config().hidden_size
    return {s.name: hidden if s.role == "block" else adapter.in_out_dims(model, s.role, s.layer)[1] for s in sites}


def optimise_targets(model, tok, adapter, reqs, prefixes: list[str], sites: tuple[Site, ...], hp: HParams,
                     engine: str = "fast", neighbors: list | None = None, progress: bool = False) -> ValueResult:
    """``neighbors[i]``: request i's (template, subject, true object) prompts (neighbour-assisted editing)."""
    dims = site_dims(model, adapter, sites)
    layers = {s.name: s.layer for s in sites}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    build = lambda rs, nbs: ValueProblem.build(tok, rs, prefixes, nbs, hp.neighbor_prefixes)  # noqa: E731
    work = working_copy(model, hp.v_dtype)
    with attention_implementation(work, hp.v_attention):
        if engine == "fast":
            def run(part: slice) -> ValueResult | OptimisationError:
                problem = build(reqs[part], neighbors[part] if neighbors else None)
                try:  # returned, not raised: the failures of every slice are reported together
                    return optimise_values(PrefixCachedForward(work, adapter, problem, layers, pad), sites, dims, hp,
                                           progress and part.start == 0, part.start)  # bar: caller only
                except OptimisationError as exc:
                    return exc

            workers = value_workers(work, hp, len(reqs))
            parts = fork_map(run, even_slices(len(reqs), workers)) if workers > 1 else [run(slice(0, len(reqs)))]
            failed = [p for p in parts if isinstance(p, OptimisationError)]
            if failed:
                raise OptimisationError.merge(failed)
        else:
            parts = []
            for i, r in enumerate(tqdm(reqs, desc="values (per request)", unit="request", disable=not progress)):
                problem = build([r], [neighbors[i]] if neighbors else None)  # the reference code's per-request loop
                parts.append(optimise_values(FullForward(work, adapter, problem, layers, pad), sites, dims, hp,
                                             first_request=i))
        result = concat_values(parts, tuple(layers))
    if work is not model:
        with torch.no_grad():
            init = {s.name: site_values(model, tok, adapter, reqs, s.name, s.layer).to(result.deltas[s.name].dtype)
                    for s in sites}
        result = ValueResult({s: init[s] + result.deltas[s] for s in layers}, init, result.deltas, result.steps,
                             result.trace)
    return result


def value_workers(model, hp: HParams, n_requests: int) -> int:
    """Processes for value optimisation: ``hp.v_workers`` on a CPU (at most one per request)."""
    if next(model.parameters()).device.type != "cpu":
        return 1
    return max(1, min(available_workers(hp.v_workers), n_requests))


def even_slices(n: int, k: int) -> list[slice]:
    """``k`` contiguous slices of ``range(n)`` whose sizes differ by at most one."""
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def concat_values(parts: list[ValueResult], sites: tuple[str, ...]) -> ValueResult:
    """One result from the results of consecutive slices of a batch (their traces already carry
    batch indices: ``optimise_values(first_request=…)``)."""
    cat = lambda attr: {s: torch.cat([getattr(p, attr)[s] for p in parts]) for s in sites}  # noqa: E731
    return ValueResult(cat("targets"), cat("init"), cat("deltas"), torch.cat([p.steps for p in parts]),
                       [row for p in parts for row in p.trace])


@torch.no_grad()
def anchor_norms(model, tok, adapter, reqs, sites: tuple[Site, ...]) -> dict[str, torch.Tensor]:
    """NAS's anchors: ``‖value‖`` of every request at every site on ``model`` (the unedited one)."""
    return {s.name: site_values(model, tok, adapter, reqs, s.name, s.layer).norm(dim=-1) for s in sites}
