"""The value loss of one step, per request, from one forward's logits.

    φ · mean_j NLL(o* | prompt_j)  +  kl_factor · KL(P_δ ‖ P_0) at the KL prompt
    + Σ_region β_region · Σ_{site in region} ‖δ_site‖ / ‖h_site‖²
    + neighbor_weight · mean NLL(o | neighbour prompts)      (neighbour-assisted editing)

β is the region's weight decay (JEEP: β' low, β* high); ``h_site`` the site's value before δ.
Also returned: the unweighted terms for the trace, and how many answer tokens of the rewriting
prompts are not yet the argmax (the stopping rules' test).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.editing.forward import StepOutput, _Forward
from pipeline.editing.hparams import HParams
from pipeline.editing.methods import Site


@dataclass
class StepLosses:
    """Per request of the part (``[len(part)]`` each)."""

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    weight_decay: torch.Tensor  # Σ_site ‖δ‖ / ‖h‖², before the regions' β
    misses: torch.Tensor  # answer tokens of the rewriting prompts that are not the argmax
    neighbor_nll: torch.Tensor


def request_losses(forward: _Forward, out: StepOutput, part: torch.Tensor, sites: tuple[Site, ...], delta: dict,
                   init: dict, init_kl: torch.Tensor, nll_w: torch.Tensor, hp: HParams) -> StepLosses:
    """Loss terms of the requests in ``part`` (ascending indices) from one forward's logits."""
    p, device = forward.p, forward.device
    N = p.n_requests
    rows = part.to(device)
    in_part = torch.zeros(N, dtype=torch.bool)
    in_part[part] = True
    tgt_mask = in_part[p.seq_request[p.tgt_seq]]
    # NLL: mean over the answer tokens of each rewriting prompt, then mean over the prompts
    # in the logits' own dtype: a bfloat16 model's log-softmax accumulates in float32 inside and
    # only its output is rounded, which the gathered NLL tolerates (the KL below does not: it is a
    # difference of nearly equal log-probabilities, so it is taken in float32)
    logp = F.log_softmax(out.tgt_logits, -1)
    tgt_tok = p.tgt_tok[tgt_mask].to(device)
    tok_lp = logp.gather(1, tgt_tok[:, None]).squeeze(1).float()
    seq_of_tok = p.tgt_seq[tgt_mask].to(device)
    per_seq = torch.zeros(len(p.encoded), device=device).index_add_(0, seq_of_tok, tok_lp)
    per_seq = per_seq / p.tgt_count.to(device).clamp(min=1).float()
    neighbor = p.neighbor.to(device) if p.neighbor is not None else torch.zeros(len(p.encoded), dtype=torch.bool, device=device)
    rewrite = (p.tgt_count > 0).to(device) & ~neighbor
    req_of_seq = p.seq_request.to(device)
    total = torch.zeros(N, device=device).index_add_(0, req_of_seq[rewrite], per_seq[rewrite])
    n_prompts = torch.zeros(N, device=device).index_add_(0, req_of_seq[rewrite], torch.ones(int(rewrite.sum()), device=device))
    nll = -(total / n_prompts)[rows]
    # argmax: is o* the top token at every answer position of every rewriting prompt?
    is_top = (out.tgt_logits.argmax(-1) == tgt_tok).float()  # the logits' order: no ties from rounding logp
    own = (~neighbor[seq_of_tok]).float()  # neighbour answers do not count
    misses = torch.zeros(N, device=device).index_add_(0, req_of_seq[seq_of_tok], (1 - is_top) * own)[rows]
    # neighbour-assisted editing: mean NLL of the true object over the request's neighbour prompts
    nb_total = torch.zeros(N, device=device).index_add_(0, req_of_seq[neighbor], per_seq[neighbor])
    nb_count = torch.zeros(N, device=device).index_add_(0, req_of_seq[neighbor], torch.ones(int(neighbor.sum()), device=device))
    nb_nll = -(nb_total / nb_count.clamp(min=1))[rows]
    # KL(P_δ ‖ P_0) at the subject-last token of "{s} is a"
    cur = F.log_softmax(out.kl_logits.float(), -1)
    kl = (cur.exp() * (cur - init_kl[rows])).sum(-1)
    # weight decay relative to each site's own norm, summed per region, weighted by the region's β
    by_region: dict = {}
    for site in sites:
        term = delta[site.name][rows].norm(dim=-1) / init[site.name][rows].norm(dim=-1) ** 2
        by_region[site.region] = by_region.get(site.region, 0) + term
    wd = sum(by_region.values())
    decay = sum(region.weight_decay * term for region, term in by_region.items())
    loss = nll_w[rows] * nll + hp.kl_factor * kl + decay
    if p.neighbor is not None and bool(p.neighbor.any()):
        loss = loss + hp.neighbor_weight * nb_nll
    return StepLosses(loss, nll, kl, wd, misses, nb_nll)
