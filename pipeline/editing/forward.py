"""Two strategies for one step's forward of value optimisation; both give the same logits.

* :class:`FullForward` – the reference: whole sequences through the whole model, all positions.
* :class:`PrefixCachedForward` – the fast path: nothing before the subject's last token depends on
  ``δ``, so those tokens run once (no grad) into a KV cache and every step only runs the suffix;
  nothing below the layer where ``δ`` enters depends on it either, so the suffix runs through
  those blocks once too and every step starts at that layer; the LM head is applied only where a
  loss is read.

A strategy is built for one :class:`~pipeline.editing.problem.ValueProblem` and a map of sites to
the layer whose output each site is (JEEP's prediction-token sites sit at the high region's last
layer); called with each site's ``δ`` for the active requests, it adds them with hooks and returns
the logits the loss needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from pipeline.editing.hooks import add_at, edit_output, hooks, record_output, run_truncated, start_at, stop_after
from pipeline.editing.methods import SITE_ROLES, site_position
from pipeline.editing.problem import ValueProblem
from pipeline.tokens import pad_right
from pipeline.models.adapters import Adapter


@dataclass
class StepOutput:
    tgt_logits: torch.Tensor  # [T_active, V] at the active target positions
    kl_logits: torch.Tensor  # [N_active, V] at the subject-last token of the KL prompts
    site_init: dict[str, torch.Tensor]  # site → [N_active, d] value before δ (first rewriting prompt)


class _Forward:
    """Shared plumbing: which sequences/targets belong to the active requests."""

    def __init__(self, model, adapter: Adapter, problem: ValueProblem, sites: Mapping[str, int], pad_id: int):
        """``sites``: site name → the layer whose module output it is."""
        self.model, self.adapter, self.p, self.pad_id = model, adapter, problem, pad_id
        self.site_layer = dict(sites)
        self.sites = tuple(self.site_layer)
        self.device = next(model.parameters()).device
        self.backbone = adapter.module(model, "backbone")
        subj = torch.tensor([e.subject_last for e in problem.encoded])
        pred = problem.pred_pos if problem.pred_pos is not None else torch.full_like(subj, -1)
        self._pred_offset = torch.where(pred >= 0, pred - subj, torch.full_like(subj, -1))

    def select(self, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The indices of the active requests' sequences, and the mask of their target tokens."""
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
                      cache=cache, use_cache=True)
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
                                                position_ids=pos.to(self.device), cache=cache,
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
                                         position_ids=pos.to(self.device), cache=cache,
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
