"""Driving optimisation and spread when they interleave: separate optimisation and iterative editing.

One *pass* optimises some sites on the current weights and spreads them over their regions.  A
method with joint optimisation has one pass per iteration; JEEP's "separate optimisation" ablation
has two (low region, then high region on the already updated weights).  Iterative editing
(Baghel et al. 2025, §3.1) repeats the passes on the *current* weights until

    |Δp_k| = |p(θ_{k+1}, ĥ_k) − p(θ_k, h̄_k)| ≤ ε      or k = max_iterations,

with ``p(θ, ·) = mean_i 1 / P_θ(o*_i | x_i)`` the target perplexity of the batch over the bare
rewrite prompts (``P`` = mean-token probability, ROME/MEMIT's per-answer probability).  Here
``p(θ_k, h̄_k)`` is what the optimised vectors achieve on the weights they were optimised on (the
last pass's δ added at its sites) and ``p(θ_{k+1}, ĥ_k)`` what the updated weights give on their
own: the loop stops once the weights reproduce the optimised hidden state.  Every iteration's
numbers, and ``p(θ_k)`` without δ, are recorded.

The model is modified in place; the caller's delta is ``W_final − W_base`` over all passes and
iterations, and ``W_base + Δ`` is made the final state so that replay is bit-exact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.editing.hparams import HParams
from pipeline.editing.methods import REGIONS, Method
from pipeline.editing.values import FullForward, ValueProblem, ValueResult


@dataclass(frozen=True)
class Pass:
    sites: tuple[str, ...]
    regions: tuple[str, ...]


def plan(spec: Method) -> list[Pass]:
    """The passes of one iteration of ``spec``."""
    if spec.joint:
        return [Pass(spec.sites, tuple(r for r in REGIONS if spec.region_writes(r)))]
    return [Pass(spec.region_sites(r), (r,)) for r in REGIONS]


@dataclass
class RunResult:
    values: list[ValueResult]  # one per pass, in order (iteration-major)
    layers: list[dict]
    deltas: dict[str, torch.Tensor]
    iterations: list[dict] = field(default_factory=list)


@torch.no_grad()
def target_perplexity(model, tok, adapter, reqs, spec: Method, hp: HParams, sites: tuple[str, ...],
                      deltas: dict[str, torch.Tensor] | None) -> float:
    """``mean_i exp(mean-token NLL of o*_i)`` on the bare rewrite prompts, with ``deltas`` (per site,
    ``[N, d]``) added at their sites, or on the weights alone (``None``)."""
    problem = ValueProblem.build(tok, reqs, [""])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    high = hp.high_layers[-1] if hp.high_layers else None
    fwd = FullForward(model, adapter, problem, hp.layers[-1], sites if deltas else (), pad, high)
    out = fwd({s: d for s, d in (deltas or {}).items()}, torch.ones(len(reqs), dtype=torch.bool))
    logp = F.log_softmax(out.tgt_logits.float(), -1).gather(1, problem.tgt_tok[:, None].to(fwd.device)).squeeze(1)
    per_seq = torch.zeros(len(problem.encoded), device=fwd.device).index_add_(0, problem.tgt_seq.to(fwd.device), logp)
    nll = -(per_seq / problem.tgt_count.to(fwd.device).clamp(min=1))[problem.first_rewrite.to(fwd.device)]
    return float(nll.exp().mean())


def run_edit(model, tok, adapter, reqs, prefixes, spec: Method, hp: HParams, covs: dict, *, apply: bool,
             engine: str = "fast", neighbors=None, stored: list[ValueResult] | None = None,
             timings: dict | None = None) -> RunResult:
    """All passes of all iterations; ``stored`` replays recorded pass targets (the ledger's apply
    stage) instead of optimising, without the stopping test (the recorded passes decide)."""
    from pipeline.editing.engine import compute_targets, spread_targets, written_projections

    timings = timings if timings is not None else {}
    names = {adapter.parameter_name(role, layer): (role, layer) for role, layer in written_projections(spec, hp)}
    params = {n: adapter.module(model, role, layer).weight for n, (role, layer) in names.items()}
    base = {n: p.detach().clone() for n, p in params.items()}
    passes = plan(spec)
    n_iter = (len(stored) // len(passes)) if stored is not None else (hp.max_iterations if hp.iterative else 1)
    values_all: list[ValueResult] = []
    layers: list[dict] = []
    iterations: list[dict] = []
    timings.setdefault("values_s", 0.0)
    timings.setdefault("spread_s", 0.0)
    keep = False
    try:
        for k in range(n_iter):
            p_start = target_perplexity(model, tok, adapter, reqs, spec, hp, (), None) if stored is None and hp.iterative else None
            for j, ps in enumerate(passes):
                t0 = time.perf_counter()
                if stored is not None:
                    values = stored[k * len(passes) + j]
                else:
                    values = compute_targets(model, tok, adapter, reqs, prefixes, spec, hp, engine, sites=ps.sites,
                                             neighbors=neighbors.prompts if neighbors else None)
                    values.trace = [{**row, "iteration": k, "pass": j} for row in values.trace]
                timings["values_s"] += time.perf_counter() - t0
                if hp.iterative and stored is None and j == len(passes) - 1:
                    p_opt = target_perplexity(model, tok, adapter, reqs, spec, hp, ps.sites, values.deltas)
                t0 = time.perf_counter()
                _, rows = spread_targets(model, tok, adapter, reqs, prefixes, spec, hp, values, covs, apply=True,
                                         regions=ps.regions)
                timings["spread_s"] += time.perf_counter() - t0
                values_all.append(values)
                layers += [{**row, "iteration": k, "pass": j} for row in rows]
            if hp.iterative and stored is None:
                p_new = target_perplexity(model, tok, adapter, reqs, spec, hp, (), None)
                dp = abs(p_new - p_opt)
                iterations.append({"iteration": k, "p_start": p_start, "p_optimised": p_opt, "p_updated": p_new,
                                   "abs_delta_p": dp, "stopped": dp <= hp.iteration_epsilon})
                if dp <= hp.iteration_epsilon:
                    break
        deltas = {}
        for n, p in params.items():
            deltas[n] = (p.detach() - base[n]).cpu()
            p.data.copy_(base[n] + deltas[n].to(p.device))  # the replayable state: W_base + Δ exactly
        keep = apply
    finally:
        if not keep:
            for n, p in params.items():
                p.data.copy_(base[n])
    return RunResult(values_all, layers, deltas, iterations)
