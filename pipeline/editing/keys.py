"""Reading hidden states at the subject's last token: keys of requests and current values.

Keys ``k`` of a request at a projection are that projection's input at the subject-last token,
averaged over the context prefixes (MEMIT's ``compute_ks``).  The spread also needs the current
value at the target site for the bare prompts.  Both are "read one module at the subject-last
token of many prompts", done here in right-padded batches with the forward stopped after the
block that holds the module.
"""

from __future__ import annotations

import torch

from pipeline.editing.hooks import hooks, record_input, record_output, run_truncated, start_at, stop_after
from pipeline.editing.methods import SITE_ROLES, site_position
from pipeline.requests import EditRequest
from pipeline.tokens import encode_with_subject, pad_right
from pipeline.models.adapters import Adapter

READ_BATCH = 64


class PromptReader:
    """Reads modules at the subject-last (or last) token of fixed prompts, layer after layer.

    The spread writes its layers lowest first and reads each layer's keys just before writing it,
    so by the time layer ``l`` is read nothing below it changes any more.  The reader keeps the
    hidden states entering the block it read last and starts the next read there (the blocks below
    are bypassed, :func:`~pipeline.editing.hooks.start_at`): for a window of five layers that is one
    pass over each block instead of one pass over every block below every layer.  The kept states
    are the very tensors a full forward hands to that block, so the values read are bit-identical
    to a full forward's.  If a parameter below the kept states has changed after all (its
    ``Tensor._version`` moved: any in-place write), or a lower layer is asked for, the read starts
    from the embeddings again.
    """

    def __init__(self, model, tok, adapter: Adapter, items: list[tuple[str, str]], position: str = "subject"):
        self.model, self.adapter = model, adapter
        self.device = next(model.parameters()).device
        self.backbone = adapter.module(model, "backbone")
        encoded = [encode_with_subject(tok, t, s) for t, s in items]
        self.chunks = []  # (ids, mask, rows, cols) per batch of prompts
        for start in range(0, len(encoded), READ_BATCH):
            chunk = encoded[start : start + READ_BATCH]
            ids, mask = pad_right([e.ids for e in chunk], pad_id=tok.pad_token_id or 0)
            cols = [e.subject_last if position == "subject" else len(e.ids) - 1 for e in chunk]
            self.chunks.append((ids.to(self.device), mask.to(self.device), torch.arange(len(chunk), device=self.device),
                                torch.tensor(cols, device=self.device)))
        self.entry = 0  # the block whose input ``states`` holds (0: start from the embeddings)
        self.states: list[torch.Tensor] = []
        self.block_output = None  # one real block output: the structure bypassed blocks return
        self.versions: list[tuple[torch.Tensor, int]] = []

    def _below(self, entry: int) -> list[torch.Tensor]:
        """Every parameter a hidden state entering block ``entry`` depends on."""
        above = {id(q) for i in range(entry, self.adapter.num_layers(self.model))
                 for q in self.adapter.module(self.model, "block", i).parameters()}
        return [q for q in self.model.parameters() if id(q) not in above]

    @torch.no_grad()
    def read(self, role: str, layer: int, what: str) -> torch.Tensor:
        """``what`` ('input'|'output') of module ``role``@``layer`` → ``[len(items), d]``."""
        if layer < self.entry or any(q._version != v for q, v in self.versions):
            self.entry, self.states = 0, []
        module = self.adapter.module(self.model, role, layer)
        block = self.adapter.module(self.model, "block", layer)
        entry_block = self.adapter.module(self.model, "block", self.entry)
        bypassed = [self.adapter.module(self.model, "block", i) for i in range(self.entry)]
        recorder = record_input if what == "input" else record_output
        out, states = [], []
        for k, (ids, mask, rows, cols) in enumerate(self.chunks):
            store: dict = {}
            regs = [record_input(block, store, "entry"), recorder(module, store, "h"),
                    record_output(block, store, "block", raw=True), stop_after(block)]
            kept = self.states[k] if self.entry else None
            with start_at(entry_block, bypassed, kept, self.block_output), hooks(regs):
                run_truncated(lambda: self.backbone(input_ids=ids, attention_mask=mask, use_cache=False))
            out.append(store["h"][rows, cols])
            states.append(store["entry"])
            self.block_output = store["block"]
        self.entry, self.states = layer, states
        self.versions = [(q, q._version) for q in self._below(layer)]
        return torch.cat(out)


def read_at_subject(model, tok, adapter: Adapter, items: list[tuple[str, str]], role: str, layer: int,
                    what: str, position: str = "subject") -> torch.Tensor:
    """``what`` ('input'|'output') of module ``role``@``layer`` at the subject-last token (or, with
    ``position='prediction'``, the last token) of each ``(template, subject)`` in ``items`` →
    ``[len(items), d]``."""
    return PromptReader(model, tok, adapter, items, position).read(role, layer, what)


class RequestKeys:
    """Keys of a batch's requests at successive layers: the mean over context prefixes of a
    projection's input (at the subject's last token, or at the prediction token for JEEP's high
    region), read with one :class:`PromptReader` so that each read starts where the last ended."""

    def __init__(self, model, tok, adapter: Adapter, requests: list[EditRequest], prefixes: list[str],
                 position: str = "subject"):
        self.shape = (len(requests), len(prefixes))
        self.reader = PromptReader(model, tok, adapter, [(p + r.prompt, r.subject) for r in requests for p in prefixes],
                                   position)

    def __call__(self, role: str, layer: int) -> torch.Tensor:
        """``[N, d_in]`` at ``role``@``layer`` with the model's current weights."""
        return self.reader.read(role, layer, "input").reshape(*self.shape, -1).mean(dim=1)


def site_values(model, tok, adapter: Adapter, requests: list[EditRequest], site: str, layer: int) -> torch.Tensor:
    """The current value at ``site`` of ``layer`` at the site's token of the bare prompts."""
    items = [(r.prompt, r.subject) for r in requests]
    return read_at_subject(model, tok, adapter, items, SITE_ROLES[site], layer, "output", site_position(site))
