"""Reading hidden states at the subject's last token: keys of requests and current values.

Keys ``k`` of a request at a projection are that projection's input at the subject-last token,
averaged over the context prefixes (MEMIT's ``compute_ks``).  The spread also needs the current
value at the target site for the bare prompts.  Both are "read one module at the subject-last
token of many prompts", done here in right-padded batches with the forward stopped after the
block that holds the module.
"""

from __future__ import annotations

import torch

from pipeline.editing.hooks import hooks, record_input, record_output, run_truncated, stop_after
from pipeline.editing.methods import SITE_ROLES, site_position
from pipeline.editing.requests import EditRequest
from pipeline.editing.tokens import encode_with_subject, pad_right
from pipeline.models.adapters import Adapter

READ_BATCH = 64


@torch.no_grad()
def read_at_subject(model, tok, adapter: Adapter, items: list[tuple[str, str]], role: str, layer: int,
                    what: str, position: str = "subject") -> torch.Tensor:
    """``what`` ('input'|'output') of module ``role``@``layer`` at the subject-last token (or, with
    ``position='prediction'``, the last token) of each ``(template, subject)`` in ``items`` →
    ``[len(items), d]``."""
    device = next(model.parameters()).device
    module = adapter.module(model, role, layer)
    encoded = [encode_with_subject(tok, t, s) for t, s in items]
    backbone = adapter.module(model, "backbone")
    out = []
    for start in range(0, len(encoded), READ_BATCH):
        chunk = encoded[start : start + READ_BATCH]
        ids, mask = pad_right([e.ids for e in chunk], pad_id=tok.pad_token_id or 0)
        store: dict = {}
        recorder = record_input if what == "input" else record_output
        with hooks([recorder(module, store, "h"), stop_after(adapter.module(model, "block", layer))]):
            run_truncated(lambda: backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False))
        rows = torch.arange(len(chunk), device=device)
        cols = torch.tensor([e.subject_last if position == "subject" else len(e.ids) - 1 for e in chunk], device=device)
        out.append(store["h"][rows, cols])
    return torch.cat(out)


def request_keys(model, tok, adapter: Adapter, requests: list[EditRequest], prefixes: list[str], role: str,
                 layer: int, position: str = "subject") -> torch.Tensor:
    """Mean over context prefixes of the input of ``role``@``layer`` → ``[N, d_in]`` (at the
    subject's last token, or at the prediction token for JEEP's high region)."""
    items = [(p + r.prompt, r.subject) for r in requests for p in prefixes]
    keys = read_at_subject(model, tok, adapter, items, role, layer, "input", position)
    return keys.reshape(len(requests), len(prefixes), -1).mean(dim=1)


def site_values(model, tok, adapter: Adapter, requests: list[EditRequest], site: str, layer: int) -> torch.Tensor:
    """The current value at ``site`` of ``layer`` at the site's token of the bare prompts."""
    items = [(r.prompt, r.subject) for r in requests]
    return read_at_subject(model, tok, adapter, items, SITE_ROLES[site], layer, "output", site_position(site))
