"""Target values: optimise one vector per request and site, for a whole batch at once.

For each request the rewriting prompts are ``prefix_j + prompt(subject) + o*[:-1]`` and one KL
prompt ``"{subject} is a"``, cut after the subject's last token where the KL is read.  A vector
``δ_site`` is added at the subject's last token at each optimised site of the last critical layer;
the loss is

    φ · mean_j NLL(o* | prompt_j)  +  kl_factor · KL(P_δ ‖ P_0) at the KL prompt
    + v_weight_decay · Σ_site ‖δ_site‖ / ‖h_site‖²

optimised with Adam; after each step each ``δ_site`` is clamped to
``clamp_norm_factor · ‖h_site‖``.  Requests never interact (their sequences are independent and
Adam is element-wise), so one batched forward/backward equals N separate optimisations; a request
that meets its stopping rule is frozen and dropped from later forwards.

Two forward strategies compute the same logits:

* :class:`FullForward` – the reference: whole sequences through the whole model, all positions.
* :class:`PrefixCachedForward` – the fast path: nothing before the subject's last token depends on
  ``δ``, so those tokens run once (no grad) into a KV cache and every step only runs the suffix;
  nothing below the layer where ``δ`` enters depends on it either, so the suffix runs through
  those blocks once too and every step starts at that layer; the LM head is applied only where a
  loss is read.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from pipeline.editing.hooks import add_at, edit_output, hooks, record_output, run_truncated, start_at, stop_after
from pipeline.editing.hparams import HParams
from pipeline.editing.methods import SITE_ROLES, site_position
from pipeline.editing.precision import master_dtype
from pipeline.editing.requests import EditRequest
from pipeline.editing.tokens import Encoded, encode_with_subject, pad_right, target_ids
from pipeline.models.adapters import Adapter

KL_TEMPLATE = "{} is a"


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
class ValueProblem:
    """The tokenised sequences of a batch: rewriting prompts per request, then one KL prompt each."""

    n_requests: int
    encoded: list[Encoded]
    seq_request: torch.Tensor  # [S] request of each sequence
    first_rewrite: torch.Tensor  # [N] index of each request's prefix-free rewriting sequence
    kl_seq: torch.Tensor  # [N] index of each request's KL sequence
    tgt_seq: torch.Tensor  # [T] sequence of each predicted target token
    tgt_pos: torch.Tensor  # [T] position whose logits predict it
    tgt_tok: torch.Tensor  # [T] the target token id
    tgt_count: torch.Tensor  # [S] target tokens per sequence (0 for KL sequences)
    # [S] position of the prediction token (last prompt token; -1 for KL sequences) and whether a
    # sequence is a neighbour prompt (neighbour-assisted editing: its target is the true object)
    pred_pos: torch.Tensor | None = None
    neighbor: torch.Tensor | None = None

    @classmethod
    def build(cls, tok, requests: list[EditRequest], prefixes: list[str],
              neighbors: list[list[tuple[str, str, str]]] | None = None, neighbor_prefixes: bool = False) -> ValueProblem:
        """``neighbors[i]``: (template, subject, true object) of request i's neighbour prompts;
        they follow the KL prompts, without context prefixes unless ``neighbor_prefixes`` (NAP)."""
        encoded, seq_request, first, kl = [], [], [], []
        tgt_seq, tgt_pos, tgt_tok, counts = [], [], [], []

        def add_answered(request: int, text: str, subject: str, answer: list[int]) -> int:
            """One prompt followed by its answer (teacher forcing); returns its sequence index."""
            e = encode_with_subject(tok, text, subject)
            s = len(encoded)
            encoded.append(Encoded(e.ids + answer[:-1], e.subject_last))
            seq_request.append(request)
            counts.append(len(answer))
            for k, tid in enumerate(answer):
                tgt_seq.append(s)
                tgt_pos.append(len(e.ids) - 1 + k)
                tgt_tok.append(tid)
            return s

        for i, r in enumerate(requests):
            tgt = target_ids(tok, r.target_new)
            first.append(add_answered(i, prefixes[0] + r.prompt, r.subject, tgt))
            for prefix in prefixes[1:]:
                add_answered(i, prefix + r.prompt, r.subject, tgt)
        for i, r in enumerate(requests):
            kl.append(len(encoded))
            e = encode_with_subject(tok, KL_TEMPLATE, r.subject)
            # the KL is read at the subject's last token and attention is causal: the template's
            # remaining tokens cannot change it, so they are not run at every step
            encoded.append(Encoded(e.ids[: e.subject_last + 1], e.subject_last))
            seq_request.append(i)
            counts.append(0)
        n_plain = len(encoded)
        for i, nbs in enumerate(neighbors or []):
            for template, subject, answer in nbs:
                tgt = target_ids(tok, answer)
                for prefix in (prefixes if neighbor_prefixes else [""]):
                    add_answered(i, prefix + template, subject, tgt)
        t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        pred = [-1] * len(encoded)
        for s, pos in zip(reversed(tgt_seq), reversed(tgt_pos)):
            pred[s] = pos  # the first target token is predicted at the last prompt token
        nb = torch.zeros(len(encoded), dtype=torch.bool)
        nb[n_plain:] = True
        return cls(len(requests), encoded, t(seq_request), t(first), t(kl), t(tgt_seq), t(tgt_pos), t(tgt_tok), t(counts),
                   t(pred), nb)


@dataclass
class StepOutput:
    tgt_logits: torch.Tensor  # [T_active, V] at the active target positions
    kl_logits: torch.Tensor  # [N_active, V] at the subject-last token of the KL prompts
    site_init: dict[str, torch.Tensor]  # site → [N_active, d] value before δ (first rewriting prompt)


class _Forward:
    """Shared plumbing: which sequences/targets belong to the active requests."""

    def __init__(self, model, adapter: Adapter, problem: ValueProblem, layer: int, sites: tuple[str, ...], pad_id: int,
                 high_layer: int | None = None):
        self.model, self.adapter, self.p, self.layer, self.sites, self.pad_id = model, adapter, problem, layer, sites, pad_id
        self.device = next(model.parameters()).device
        self.backbone = adapter.module(model, "backbone")
        # prediction-token sites (JEEP's high region) sit at the last layer of the high region
        self.site_layer = {s: high_layer if site_position(s) == "prediction" else layer for s in sites}
        if any(v is None for v in self.site_layer.values()):
            raise ValueError("prediction-token sites need high_layer")
        subj = torch.tensor([e.subject_last for e in problem.encoded])
        pred = problem.pred_pos if problem.pred_pos is not None else torch.full_like(subj, -1)
        self._pred_offset = torch.where(pred >= 0, pred - subj, torch.full_like(subj, -1))

    def select(self, active: torch.Tensor):
        """Sequence indices, target mask and request→row map for the active requests."""
        p = self.p
        seqs = torch.nonzero(active[p.seq_request]).squeeze(1)
        tgt_mask = active[p.seq_request[p.tgt_seq]]
        return seqs, tgt_mask

    def _hook_regs(self, deltas: dict[str, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor,
                   seq_req_row: torch.Tensor, first_rows: torch.Tensor, init: dict, seqs: torch.Tensor | None = None):
        """Hooks adding each site's δ at its token: subject sites at ``cols`` (the subject's last
        token) of every sequence, prediction sites at the last prompt token of every sequence with
        a target (not the KL prompts: their KL is read at the subject's last token)."""
        regs = []
        for site in self.sites:
            module = self.adapter.module(self.model, SITE_ROLES[site], self.site_layer[site])
            r, c, q, fc = rows, cols, seq_req_row, cols[first_rows]
            if site_position(site) == "prediction":
                off = self._pred_offset[seqs].to(cols.device)
                keep = off >= 0
                r, c, q, fc = rows[keep], (cols + off)[keep], seq_req_row[keep], (cols + off)[first_rows]

            def fn(h, site=site, r=r, c=c, q=q, fc=fc):
                init[site] = h[first_rows, fc].detach()
                return add_at(r, c, deltas[site][q])(h)

            regs.append(edit_output(module, fn))
        return regs


class FullForward(_Forward):
    """Reference strategy: the whole right-padded sequences, logits everywhere."""

    def __call__(self, deltas: dict[str, torch.Tensor], active: torch.Tensor) -> StepOutput:
        p = self.p
        seqs, tgt_mask = self.select(active)
        local = torch.full((len(p.encoded),), -1, dtype=torch.long)
        local[seqs] = torch.arange(len(seqs))
        req_row = torch.cumsum(active.long(), 0) - 1  # request → row in the active δ
        ids, mask = pad_right([p.encoded[s].ids for s in seqs.tolist()], self.pad_id)
        rows = torch.arange(len(seqs))
        cols = torch.tensor([p.encoded[s].subject_last for s in seqs.tolist()])
        first_rows = local[p.first_rewrite[active]]
        init: dict = {}
        regs = self._hook_regs(deltas, rows.to(self.device), cols.to(self.device), req_row[p.seq_request[seqs]].to(self.device), first_rows.to(self.device), init, seqs)
        with hooks(regs):
            hidden = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False).last_hidden_state
        logits = self.adapter.logits(self.model, hidden)
        tgt_rows = local[p.tgt_seq[tgt_mask]].to(self.device)
        kl_rows = local[p.kl_seq[active]].to(self.device)
        kl_cols = cols.to(self.device)[kl_rows]
        return StepOutput(logits[tgt_rows, p.tgt_pos[tgt_mask].to(self.device)], logits[kl_rows, kl_cols], init)


class PrefixCachedForward(_Forward):
    """Fast strategy: the part before each subject's last token is run once into a KV cache."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.p
        self.prefix_len = torch.tensor([e.subject_last for e in p.encoded])
        self.suffix_len = torch.tensor([len(e.ids) - e.subject_last for e in p.encoded])
        self._kv = None  # per-layer (keys, values) of all sequences' left-padded prefixes
        self._selected: dict[tuple, list] = {}  # prefix KV of each chunk of sequences
        self._prefix_width = int(self.prefix_len.max())
        if self._prefix_width:
            self._kv = self._run_prefixes()
        # nothing below the lowest layer where a δ enters depends on δ either: the suffixes run
        # through those blocks once, and every step starts at that layer
        self.start = min(self.site_layer.values())
        self._below: torch.Tensor | None = None
        self._below_output = None
        self._entry = self.adapter.module(self.model, "block", self.start)
        self._bypassed = [self.adapter.module(self.model, "block", i) for i in range(self.start)]
        if self.start:
            self._below, self._below_output = self._run_below()

    @torch.no_grad()
    def _run_prefixes(self):
        p, W = self.p, self._prefix_width
        ids = torch.full((len(p.encoded), W), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(p.encoded), W), dtype=torch.long)
        for i, e in enumerate(p.encoded):
            n = e.subject_last
            if n:
                ids[i, W - n :] = torch.tensor(e.ids[:n])
                mask[i, W - n :] = 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        # no config: sliding-window layers would keep only the last window of the prefix, and the
        # rebuilt cache would no longer line up with the prefix attention mask
        cache = DynamicCache()
        self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=pos.to(self.device),
                      past_key_values=cache, use_cache=True)
        self._prefix_mask = mask
        return [(layer.keys, layer.values) for layer in cache.layers]

    @torch.no_grad()
    def _run_below(self):
        """Every sequence's suffix through blocks ``0..start-1``: the right-padded ``[S, width, d]``
        hidden states entering block ``start``, and one real output of a block (its structure)."""
        p, W = self.p, self._prefix_width
        ids, smask = pad_right([e.ids[e.subject_last :] for e in p.encoded], self.pad_id)
        pos = self.prefix_len[:, None] + torch.arange(ids.shape[1])[None, :]
        mask = torch.cat([self._prefix_mask, smask], 1) if W else smask
        cache = DynamicCache(ddp_cache_data=self._kv) if W else None
        store: dict = {}
        top = self.adapter.module(self.model, "block", self.start - 1)
        with hooks([record_output(top, store, "hidden"), record_output(top, store, "output", raw=True), stop_after(top)]):
            run_truncated(lambda: self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                                position_ids=pos.to(self.device), past_key_values=cache,
                                                use_cache=cache is not None))
        return store["hidden"], store["output"]

    def _cache_rows(self, seqs: torch.Tensor):
        """A fresh cache holding the prefixes of ``seqs`` (the suffix pass appends to it)."""
        if self._kv is None:
            return None
        key = tuple(seqs.tolist())
        if key not in self._selected:
            if sum(len(k) for k in self._selected) + len(key) > len(self.p.encoded):
                self._selected.clear()  # the active set changed: earlier chunks are stale
            idx = seqs.to(self.device)
            self._selected[key] = [(k[idx], v[idx]) for k, v in self._kv]
        return DynamicCache(ddp_cache_data=self._selected[key])

    def __call__(self, deltas: dict[str, torch.Tensor], active: torch.Tensor) -> StepOutput:
        p, W = self.p, self._prefix_width
        seqs, tgt_mask = self.select(active)
        local = torch.full((len(p.encoded),), -1, dtype=torch.long)
        local[seqs] = torch.arange(len(seqs))
        req_row = torch.cumsum(active.long(), 0) - 1
        # sequences sorted by suffix length and run in buckets: padding every suffix to the
        # longest one would spend about half of the work on pads
        order = torch.argsort(self.suffix_len[seqs], stable=True)
        width = int(self.suffix_len[seqs].max())
        parts, heads = [], {site: [] for site in self.sites}
        for bucket in length_buckets(self.suffix_len[seqs][order].tolist()):
            rows_b = order[bucket]
            seqs_b = seqs[rows_b]
            ids, smask = pad_right([p.encoded[s].ids[p.encoded[s].subject_last :] for s in seqs_b.tolist()], self.pad_id)
            pos = self.prefix_len[seqs_b][:, None] + torch.arange(ids.shape[1])[None, :]
            mask = torch.cat([self._prefix_mask[seqs_b], smask], 1) if W else smask
            cache = self._cache_rows(seqs_b)
            rows = torch.arange(len(seqs_b), device=self.device)
            cols = torch.zeros(len(seqs_b), dtype=torch.long, device=self.device)
            head: dict = {}  # each site's value at every row's first suffix token (the subject's last)
            regs = self._hook_regs(deltas, rows, cols, req_row[p.seq_request[seqs_b]].to(self.device), rows, head,
                                   seqs_b)
            entering = self._below[seqs_b.to(self.device), : ids.shape[1]] if self.start else None
            with hooks(regs), start_at(self._entry, self._bypassed, entering, self._below_output):
                hidden_b = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                         position_ids=pos.to(self.device), past_key_values=cache,
                                         use_cache=cache is not None).last_hidden_state
            parts.append(F.pad(hidden_b, (0, 0, 0, width - hidden_b.shape[1])))
            for site in self.sites:
                heads[site].append(head[site])
        back = torch.argsort(order).to(self.device)  # bucket order → seqs order
        hidden = torch.cat(parts)[back]
        first_rows = local[p.first_rewrite[active]].to(self.device)
        init = {site: torch.cat(heads[site])[back][first_rows] for site in self.sites}
        tgt_rows = local[p.tgt_seq[tgt_mask]]
        tgt_cols = p.tgt_pos[tgt_mask] - self.prefix_len[p.tgt_seq[tgt_mask]]
        kl_rows = local[p.kl_seq[active]]
        gathered = torch.cat([hidden[tgt_rows.to(self.device), tgt_cols.to(self.device)], hidden[kl_rows.to(self.device), 0]])
        logits = self.adapter.logits(self.model, gathered)
        n_t = len(tgt_rows)
        return StepOutput(logits[:n_t], logits[n_t:], init)


BUCKET_OVERHEAD_TOKENS = 64  # what one more forward call costs, in padded suffix tokens (measured order)


def length_buckets(lengths: list[int], overhead: int | None = None) -> list[slice]:
    """Split ascending ``lengths`` into runs, each padded to its own maximum.

    A run of equal lengths joins the current bucket when padding the bucket's rows up to the
    new length costs no more than ``overhead`` tokens (the price of another forward call).
    """
    overhead = BUCKET_OVERHEAD_TOKENS if overhead is None else overhead
    buckets, start = [], 0
    for i in range(1, len(lengths)):
        if (i - start) * (lengths[i] - lengths[i - 1]) > overhead:
            buckets.append(slice(start, i))
            start = i
    if lengths:
        buckets.append(slice(start, len(lengths)))
    return buckets


@dataclass
class ValueResult:
    targets: dict[str, torch.Tensor]  # site → [N, d] target value h_init + δ
    init: dict[str, torch.Tensor]  # site → [N, d] value before δ
    deltas: dict[str, torch.Tensor]  # site → [N, d]
    steps: torch.Tensor  # [N] optimisation steps taken per request
    trace: list[dict] = field(default_factory=list)  # one row per (request, step)


def _request_losses(forward: _Forward, out: StepOutput, part: torch.Tensor, delta: dict, init: dict,
                    init_kl: torch.Tensor, nll_w: torch.Tensor, hp: HParams):
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
    # weight decay relative to each site's own norm
    wd = sum(delta[s][rows].norm(dim=-1) / init[s][rows].norm(dim=-1) ** 2 for s in delta)
    loss = nll_w[rows] * nll + hp.kl_factor * kl + hp.v_weight_decay * wd
    if any(site_position(s) == "prediction" for s in delta):  # JEEP: β' and β* per region
        loss = nll_w[rows] * nll + hp.kl_factor * kl + sum(
            site_coefficients(hp, s)[1] * delta[s][rows].norm(dim=-1) / init[s][rows].norm(dim=-1) ** 2 for s in delta)
    if p.neighbor is not None and bool(p.neighbor.any()):
        loss = loss + hp.neighbor_weight * nb_nll
    return loss, nll, kl, wd, misses, nb_nll


def site_coefficients(hp: HParams, site: str) -> tuple[float, float]:
    """(clamp factor γ, weight-decay coefficient β) of a site: JEEP's γ*, β* at the prediction token."""
    if site_position(site) == "prediction":
        return hp.high_clamp_norm_factor, hp.high_v_weight_decay
    return hp.clamp_norm_factor, hp.v_weight_decay


def optimise_values(forward: _Forward, sites: tuple[str, ...], dims: dict[str, int], hp: HParams,
                    progress: bool = False, first_request: int = 0) -> ValueResult:
    """Jointly optimise δ for every request and site (per-request stopping, per-site clamps).

    Each step runs the active requests in chunks of ``hp.v_batch_requests`` and accumulates their
    gradients before one Adam step: the requests are independent, so this is the same
    optimisation as one big batch, with peak memory bounded by the chunk.  ``first_request``: the
    batch index of this problem's first request (a slice of a batch), for the trace and errors.
    """
    p = forward.p
    N, device = p.n_requests, forward.device
    dtype = master_dtype(next(forward.model.parameters()).dtype)
    delta = {s: torch.zeros(N, dims[s], device=device, dtype=dtype, requires_grad=True) for s in sites}
    opt = torch.optim.Adam(list(delta.values()), lr=hp.v_lr)
    active = torch.ones(N, dtype=torch.bool)
    nll_w = torch.full((N,), hp.nll_weight, dtype=dtype, device=device)
    steps = torch.zeros(N, dtype=torch.long)
    init = {s: torch.zeros(N, dims[s], device=device, dtype=dtype) for s in sites}
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
                out = forward({s: delta[s][part.to(device)] for s in sites}, in_part)
                if it == 0:  # δ = 0 here: the unedited values and distributions
                    for s in sites:
                        init[s][part.to(device)] = out.site_init[s].detach().to(dtype)
                    kl0 = F.log_softmax(out.kl_logits.float(), -1).detach()
                    if init_kl is None:
                        init_kl = torch.zeros(N, kl0.shape[-1], device=device)
                    init_kl[part.to(device)] = kl0
                loss, nll, kl, wd, misses, nb_nll = _request_losses(forward, out, part, delta, init, init_kl, nll_w, hp)
                if not torch.isfinite(loss).all():
                    bad = part[~torch.isfinite(loss).cpu()].tolist()
                    raise OptimisationError(it, [b + first_request for b in bad])
                rec = torch.stack([loss, nll, kl, wd, nll_w[part.to(device)], misses, nb_nll]).detach().cpu().tolist()
                norms = {s: delta[s][part.to(device)].detach().norm(dim=-1).cpu().tolist() for s in sites}
                for k, r in enumerate(part.tolist()):
                    trace.append({"request": r + first_request, "step": it, "loss": rec[0][k], "nll": rec[1][k], "kl": rec[2][k],
                                  "weight_decay": rec[3][k], "nll_weight": rec[4][k], "argmax": rec[5][k] == 0,
                                  **({"neighbor_nll": rec[6][k]} if p.neighbor is not None and bool(p.neighbor.any()) else {}),
                                  **{f"norm_{s}": norms[s][k] for s in sites}})
                # stopping rules, decided before the step (as the reference code does)
                stop = (loss < hp.loss_stop).cpu()
                if hp.nll_weight_after_argmax is not None:
                    reached = (misses == 0).cpu()
                    nll_w[part[reached].to(device)] = hp.nll_weight_after_argmax
                    stop |= reached & (kl <= hp.kl_stop).cpu()
                done[part[stop]] = True
                if not last and not stop.all():
                    loss[~stop.to(device)].sum().backward()
            steps[idx] = it
            active &= ~done
            if last or not active.any():
                break
            frozen = {s: delta[s].detach()[~active.to(device)].clone() for s in sites}
            opt.step()
            with torch.no_grad():
                for s in sites:
                    d = delta[s]
                    d[~active.to(device)] = frozen[s]
                    max_norm = site_coefficients(hp, s)[0] * init[s].norm(dim=-1)
                    norms = d.norm(dim=-1)
                    scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
                    d.mul_(scale[:, None])
                    if not torch.isfinite(d).all():
                        raise OptimisationError(it)
    final = {s: delta[s].detach() for s in sites}
    return ValueResult(targets={s: init[s] + final[s] for s in sites}, init=init, deltas=final, steps=steps + 1, trace=trace)
