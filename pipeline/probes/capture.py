"""Reading the residual stream around every block's attention and MLP, at chosen tokens.

For layer ``l`` the probes need ``h_in`` (the block's input), ``h_mid = h_in + a`` (after the
attention's contribution ``a`` joined the residual) and ``h_out`` (the block's output, after the
MLP's contribution).  ``a`` is read at the adapter's ``attn_resid`` role, so the same arithmetic
holds for sequential blocks (``h_out = h_mid + m``), parallel blocks (``h_out = h_in + a + m``:
``h_mid`` is then "before the MLP's contribution") and Gemma's post-attention norm.  ``h_in`` of
layer ``l > 0`` is ``h_out`` of layer ``l − 1`` (nothing runs between blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.editing.hooks import hooks, record_output
from pipeline.tokens import encode_with_subject, pad_right
from pipeline.models.adapters import Adapter

POSITIONS = ("subject_last", "prediction")


@dataclass
class States:
    """``[n_layers, n_items, n_positions, d]`` residual states at ``POSITIONS`` of each item."""

    h_in: torch.Tensor
    h_mid: torch.Tensor
    h_out: torch.Tensor


def _record_block_input(module, store: dict, key):
    def register():
        def pre(_m, args, kwargs):
            store[key] = args[0] if args else kwargs["hidden_states"]
        return module.register_forward_pre_hook(pre, with_kwargs=True)
    return register


@torch.no_grad()
def capture_states(model, tok, adapter: Adapter, items: list[tuple[str, str]], batch_size: int = 32) -> States:
    """States at the subject's last token and the last (prediction) token of each
    ``(template, subject)`` prompt, for every layer (float32, on the CPU)."""
    device = next(model.parameters()).device
    n_layers = adapter.num_layers(model)
    backbone = adapter.module(model, "backbone")
    encoded = [encode_with_subject(tok, t, s) for t, s in items]
    outs: dict[str, list] = {"in": [], "mid": [], "out": []}
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask = pad_right([e.ids for e in chunk], tok.pad_token_id or 0)
        store: dict = {}
        regs = [_record_block_input(adapter.module(model, "block", 0), store, "in0")]
        for layer in range(n_layers):
            regs.append(record_output(adapter.module(model, "block", layer), store, ("out", layer)))
            regs.append(record_output(adapter.module(model, "attn_resid", layer), store, ("attn", layer)))
        with hooks(regs):
            backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        rows = torch.arange(len(chunk), device=device)[:, None]
        cols = torch.tensor([[e.subject_last, len(e.ids) - 1] for e in chunk], device=device)
        take = lambda h: h[rows, cols].float().cpu()  # noqa: E731  [B, 2, d]
        h_out = [take(store[("out", layer)]) for layer in range(n_layers)]
        h_in = [take(store["in0"])] + h_out[:-1]
        h_mid = [h_in[layer] + take(store[("attn", layer)]) for layer in range(n_layers)]
        outs["in"].append(torch.stack(h_in))
        outs["mid"].append(torch.stack(h_mid))
        outs["out"].append(torch.stack(h_out))
    cat = lambda k: torch.cat(outs[k], dim=1)  # noqa: E731
    return States(cat("in"), cat("mid"), cat("out"))


@torch.no_grad()
def logit_lens(model, adapter: Adapter, h: torch.Tensor) -> torch.Tensor:
    """``log softmax(W_lm · ln_f(h))`` for states ``[..., d]`` (the model's own final norm and head)."""
    device = next(model.parameters()).device
    norm = adapter.module(model, "final_norm")
    flat = h.reshape(-1, h.shape[-1]).to(device, next(model.parameters()).dtype)
    out = []
    for part in flat.split(256):
        out.append(torch.log_softmax(adapter.logits(model, norm(part)).float(), -1).cpu())
    return torch.cat(out).reshape(*h.shape[:-1], -1)
