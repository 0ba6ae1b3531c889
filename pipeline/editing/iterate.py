"""Iterative editing (Baghel et al. 2025, §3.1): when to stop repeating optimise + spread.

The driver repeats the passes of a method on the *current* weights until

    |Δp_k| = |p(θ_{k+1}, ĥ_k) − p(θ_k, h̄_k)| ≤ ε      or k = max_iterations,

with ``p(θ, ·) = mean_i 1 / P_θ(o*_i | x_i)`` the target perplexity of the batch over the bare
rewrite prompts (``P`` = mean-token probability, ROME/MEMIT's per-answer probability).  Here
``p(θ_k, h̄_k)`` is what the optimised vectors achieve on the weights they were optimised on (the
last pass's δ added at its sites) and ``p(θ_{k+1}, ĥ_k)`` what the updated weights give on their
own: the loop stops once the weights reproduce the optimised hidden state.  Every iteration's
numbers, and ``p(θ_k)`` without δ, are recorded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.editing.forward import FullForward
from pipeline.editing.hparams import HParams
from pipeline.editing.methods import Site
from pipeline.editing.optimise import ValueResult
from pipeline.editing.problem import ValueProblem


@torch.no_grad()
def target_perplexity(model, tok, adapter, reqs, sites: tuple[Site, ...] = (),
                      deltas: dict[str, torch.Tensor] | None = None) -> float:
    """``mean_i exp(mean-token NLL of o*_i)`` on the bare rewrite prompts, with ``deltas`` (per site,
    ``[N, d]``) added at ``sites``, or on the weights alone."""
    problem = ValueProblem.build(tok, reqs, [""])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    fwd = FullForward(model, adapter, problem, {s.name: s.layer for s in sites} if deltas else {}, pad)
    out = fwd(dict(deltas or {}), torch.ones(len(reqs), dtype=torch.bool))
    logp = F.log_softmax(out.tgt_logits.float(), -1).gather(1, problem.tgt_tok[:, None].to(fwd.device)).squeeze(1)
    per_seq = torch.zeros(len(problem.encoded), device=fwd.device).index_add_(0, problem.tgt_seq.to(fwd.device), logp)
    nll = -(per_seq / problem.tgt_count.to(fwd.device).clamp(min=1))[problem.first_rewrite.to(fwd.device)]
    return float(nll.exp().mean())


class IterationTest:
    """The stopping test of one iterative edit; the driver reports each iteration to it."""

    def __init__(self, model, tok, adapter, reqs, hp: HParams):
        self.model, self.tok, self.adapter, self.reqs, self.hp = model, tok, adapter, reqs, hp
        self.rows: list[dict] = []
        self._start = self._optimised = None

    def started(self) -> None:
        """Iteration k begins: ``p(θ_k)``."""
        self._start = target_perplexity(self.model, self.tok, self.adapter, self.reqs)

    def optimised(self, sites: tuple[Site, ...], values: ValueResult) -> None:
        """The last pass's vectors are optimised (not yet spread): ``p(θ_k, h̄_k)``."""
        self._optimised = target_perplexity(self.model, self.tok, self.adapter, self.reqs, sites, values.deltas)

    def stop(self) -> bool:
        """Iteration k is spread: ``p(θ_{k+1}, ĥ_k)``; is ``|Δp| ≤ ε``?"""
        p_new = target_perplexity(self.model, self.tok, self.adapter, self.reqs)
        dp = abs(p_new - self._optimised)
        done = dp <= self.hp.iteration_epsilon
        self.rows.append({"iteration": len(self.rows), "p_start": self._start, "p_optimised": self._optimised,
                          "p_updated": p_new, "abs_delta_p": dp, "stopped": done})
        return done
