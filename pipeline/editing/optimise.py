"""Optimising the target values of a batch: one vector δ per request and site, Adam, per-request stops.

The loss (:mod:`pipeline.editing.loss`) is minimised with Adam; after each step each ``δ_site`` is
clamped to ``clamp_norm_factor · ‖h_site‖`` of its region.  Requests never interact (their
sequences are independent and Adam is element-wise), so one batched forward/backward equals N
separate optimisations; a request that meets its stopping rule is frozen and dropped from later
forwards.  Stopping rules: MEMIT's (loss below ``loss_stop``) and, with
``nll_weight_after_argmax``, PMET's (once o* is the argmax on every rewriting prompt the NLL
weight drops to ψ, and the request stops when KL ≤ ``kl_stop``) and, with ``argmax_stop_steps`` = k,
ENCORE's most-probable early stopping (o* the argmax on every rewriting prompt k steps in a row).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline.editing.forward import _Forward
from pipeline.editing.hparams import HParams
from pipeline.editing.loss import request_losses
from pipeline.editing.methods import Site
from pipeline.editing.precision import master_dtype


class OptimisationError(RuntimeError):
    """Non-finite values appeared while optimising target values (``requests``: the batch indices
    whose loss was non-finite, when known), so that slices of a batch can report as one."""

    def __init__(self, step: int, requests: list[int] | None = None):
        what = f"loss at step {step} for request(s) {requests}" if requests else f"δ at step {step}"
        super().__init__(f"non-finite {what}; lower v_lr or check the model")
        self.step, self.requests = step, requests

    def __reduce__(self):  # pickled by value workers (workers.py): keep the fields, not the text
        return type(self), (self.step, self.requests)

    @classmethod
    def merge(cls, errors: list[OptimisationError]) -> OptimisationError:
        """One error for the failures of several slices: the earliest step, every request named."""
        step = min(e.step for e in errors)
        requests = sorted({r for e in errors if e.step == step for r in (e.requests or [])})
        return cls(step, requests or None)



@dataclass
class ValueResult:
    targets: dict[str, torch.Tensor]  # site → [N, d] target value h_init + δ
    init: dict[str, torch.Tensor]  # site → [N, d] value before δ
    deltas: dict[str, torch.Tensor]  # site → [N, d]
    steps: torch.Tensor  # [N] optimisation steps taken per request
    trace: list[dict] = field(default_factory=list)  # one row per (request, step)



def optimise_values(forward: _Forward, sites: tuple[Site, ...], dims: dict[str, int], hp: HParams,
                    progress: bool = False, first_request: int = 0) -> ValueResult:
    """Jointly optimise δ for every request and site (per-request stopping, per-region clamps).

    Each step runs the active requests in chunks of ``hp.v_batch_requests`` and accumulates their
    gradients before one Adam step: the requests are independent, so this is the same
    optimisation as one big batch, with peak memory bounded by the chunk.  ``first_request``: the
    batch index of this problem's first request (a slice of a batch), for the trace and errors.
    """
    p = forward.p
    N, device = p.n_requests, forward.device
    clamps = {s.name: s.region.clamp_norm_factor for s in sites}
    names = tuple(clamps)
    dtype = master_dtype(next(forward.model.parameters()).dtype)
    delta = {s: torch.zeros(N, dims[s], device=device, dtype=dtype, requires_grad=True) for s in names}
    opt = torch.optim.Adam(list(delta.values()), lr=hp.v_lr)
    active = torch.ones(N, dtype=torch.bool)
    nll_w = torch.full((N,), hp.nll_weight, dtype=dtype, device=device)
    steps = torch.zeros(N, dtype=torch.long)
    streak = torch.zeros(N, dtype=torch.long)  # steps in a row with o* the argmax (ENCORE's early stop)
    init = {s: torch.zeros(N, dims[s], device=device, dtype=dtype) for s in names}
    init_kl: torch.Tensor | None = None
    trace: list[dict] = []
    # no tqdm object at all without progress: a forked value worker (workers.py) must not touch
    # tqdm's class lock, which the parent's monitor thread may have held at fork time
    with tqdm(total=hp.v_num_grad_steps, desc=f"values ({N} requests)", unit="step") if progress else nullcontext() as bar:
        for it in range(hp.v_num_grad_steps):
            if bar is not None:
                bar.update()
            last = it == hp.v_num_grad_steps - 1
            idx = torch.nonzero(active).squeeze(1)
            done = torch.zeros(N, dtype=torch.bool)
            opt.zero_grad(set_to_none=False)
            for part in idx.split(hp.v_batch_requests):
                in_part = torch.zeros(N, dtype=torch.bool)
                in_part[part] = True
                out = forward({s: delta[s][part.to(device)] for s in names}, in_part)
                if it == 0:  # δ = 0 here: the unedited values and distributions
                    for s in names:
                        init[s][part.to(device)] = out.site_init[s].detach().to(dtype)
                    kl0 = F.log_softmax(out.kl_logits.float(), -1).detach()
                    if init_kl is None:
                        init_kl = torch.zeros(N, kl0.shape[-1], device=device)
                    init_kl[part.to(device)] = kl0
                terms = request_losses(forward, out, part, sites, delta, init, init_kl, nll_w, hp)
                loss, misses = terms.loss, terms.misses
                if not torch.isfinite(loss).all():
                    bad = part[~torch.isfinite(loss).cpu()].tolist()
                    raise OptimisationError(it, [b + first_request for b in bad])
                rec = torch.stack([loss, terms.nll, terms.kl, terms.weight_decay, nll_w[part.to(device)], misses,
                                   terms.neighbor_nll]).detach().cpu().tolist()
                norms = {s: delta[s][part.to(device)].detach().norm(dim=-1).cpu().tolist() for s in names}
                for k, r in enumerate(part.tolist()):
                    trace.append({"request": r + first_request, "step": it, "loss": rec[0][k], "nll": rec[1][k], "kl": rec[2][k],
                                  "weight_decay": rec[3][k], "nll_weight": rec[4][k], "argmax": rec[5][k] == 0,
                                  **({"neighbor_nll": rec[6][k]} if p.neighbor is not None and bool(p.neighbor.any()) else {}),
                                  **{f"norm_{s}": norms[s][k] for s in names}})
                # stopping rules, decided before the step (as the reference code does)
                stop = (loss < hp.loss_stop).cpu()
                if hp.nll_weight_after_argmax is not None:
                    reached = (misses == 0).cpu()
                    nll_w[part[reached].to(device)] = hp.nll_weight_after_argmax
                    stop |= reached & (terms.kl <= hp.kl_stop).cpu()
                if hp.argmax_stop_steps:
                    streak[part] = torch.where((misses == 0).cpu(), streak[part] + 1, 0)
                    stop |= streak[part] >= hp.argmax_stop_steps
                done[part[stop]] = True
                if not last and not stop.all():
                    loss[~stop.to(device)].sum().backward()
            steps[idx] = it
            active &= ~done
            if last or not active.any():
                break
            frozen = {s: delta[s].detach()[~active.to(device)].clone() for s in names}
            opt.step()
            with torch.no_grad():
                for s in names:
                    d = delta[s]
                    d[~active.to(device)] = frozen[s]
                    max_norm = clamps[s] * init[s].norm(dim=-1)
                    norms = d.norm(dim=-1)
                    scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
                    d.mul_(scale[:, None])
                    if not torch.isfinite(d).all():
                        raise OptimisationError(it)
    final = {s: delta[s].detach() for s in names}
    return ValueResult(targets={s: init[s] + final[s] for s in names}, init=init, deltas=final, steps=steps + 1, trace=trace)
