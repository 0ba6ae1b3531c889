"""Deterministic free generation for the fluency and consistency metrics.

ROME/MEMIT sample with top-k (k = 5) from each generation prompt.  Sampling makes the metric
depend on the random stream, so every sequence gets its own generator, seeded from the evaluation
seed and a caller-given key (record id + prompt number): a record's text does not depend on which
other records share its batch, on the batch size, or on the order of evaluation.  (Padding other
sequences into the batch changes the floating-point logits in the last bits, which could flip a
draw that falls exactly on a boundary; for a fixed request set and settings the output is
bit-identical.)  Decoding prompts of one length only, without padding, would remove even that,
but costs 2–10× more decoding steps on a batch of 10–100 records, so it is not done; with the
evaluation cache (:mod:`pipeline.evaluation.cache`) a state's text of a prompt is computed once and
read back whatever batch asks for it again.  Draws are made on the CPU from the top-k
probabilities, so the same generator stream is used on any device.

Prompts are left-padded (position ids skip the padding) and decoded with a KV cache; logits are
computed only for the last position.  A sequence ends at the tokenizer's EOS or after
``max_new_tokens``; the returned text is the prompt followed by the continuation, as in the
reference code, whose entropy is computed over both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline import distributed
from pipeline.tokens import encode_prompt
from pipeline.models.adapters import adapter_for


@dataclass(frozen=True)
class DecodingSettings:
    prompts_per_record: int = 2
    max_new_tokens: int = 40
    top_k: int = 5
    batch_size: int = 32
    seed: int = 0

    def describe(self) -> dict:
        return {"strategy": "top-k sampling, temperature 1, per-sequence seeded generator",
                "prompts_per_record": self.prompts_per_record, "max_new_tokens": self.max_new_tokens,
                "top_k": self.top_k, "seed": self.seed, "stop": "EOS or max_new_tokens",
                "text": "prompt + continuation (as ROME/MEMIT)"}


def sequence_seed(seed: int, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


@torch.no_grad()
def _generate_batch(model, tok, prompts: list[list[int]], gens: list[torch.Generator],
                    s: DecodingSettings) -> list[list[int]]:
    adapter = adapter_for(model)
    backbone = adapter.module(model, "backbone")
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos = tok.eos_token_id
    ids, mask = _left_pad(prompts, pad)
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(s.max_new_tokens):
        logits = adapter.logits(model, out.last_hidden_state[:, -1]).float()
        top, idx = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1)
        probs = torch.softmax(top, -1).cpu()
        pick = torch.stack([torch.multinomial(probs[b], 1, generator=gens[b]) for b in range(len(prompts))])
        nxt = idx.gather(1, pick.to(device))
        for b, t in enumerate(nxt[:, 0].tolist()):
            if not done[b]:
                done[b] = t == eos
                if not done[b]:
                    new[b].append(t)
        if all(done) or step == s.max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        pos = pos[:, -1:] + 1
        out = backbone(input_ids=nxt, attention_mask=mask, position_ids=pos, cache=out.cache,
                       use_cache=True)
    return new


def generate(model, tok, prompts: Sequence[str], keys: Sequence[str], settings: DecodingSettings,
             cache=None) -> list[str]:
    """``prompt + continuation`` for every prompt; ``keys[i]`` seeds sequence i (see the module doc).
    ``cache``: a :class:`~pipeline.evaluation.cache.StateCache` of the model's state, read and filled."""
    if len(prompts) != len(keys):
        raise ValueError("generate needs one key per prompt")
    asked = [[encode_prompt(tok, p), sequence_seed(settings.seed, k), tok.eos_token_id, settings.top_k,
              settings.max_new_tokens] for p, k in zip(prompts, keys)]

    def run(todo: list) -> list[list[int]]:
        order = sorted(range(len(todo)), key=lambda i: (len(todo[i][0]), i))  # little padding
        batches = [order[start : start + settings.batch_size] for start in range(0, len(order), settings.batch_size)]

        def decode(idx: list[int]) -> list[list[int]]:
            gens = [torch.Generator().manual_seed(todo[i][1]) for i in idx]
            return _generate_batch(model, tok, [todo[i][0] for i in idx], gens, settings)

        out: list[list[int]] = [[] for _ in todo]
        # under torchrun each rank decodes whole batches: every sequence in the batch it has in one process
        for idx, conts in zip(batches, distributed.map_shared(decode, batches, "generation")):
            for i, cont in zip(idx, conts):
                out[i] = cont
        return out

    conts = run(asked) if cache is None else cache.cached("generation", asked, run)
    return [p + tok.decode(c, skip_special_tokens=True) for p, c in zip(prompts, conts)]
