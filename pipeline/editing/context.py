"""Context prefixes: short model-generated texts prepended to rewriting prompts.

MEMIT/PMET average keys and optimise values over several contexts so that the edit holds in
varied surroundings.  The reference code samples them without a seed; here sampling runs under a
fixed seed in a forked RNG, so the same model gives the same prefixes and global RNG state is left
untouched.  The prefixes are returned to the caller to be recorded with the edit.
"""

from __future__ import annotations

import torch

from pipeline.editing.hparams import HParams


@torch.no_grad()
def context_prefixes(model, tok, hp: HParams) -> list[str]:
    """``[""]`` plus one sampled ``context_length``-token text per starter word, each + ". "."""
    device = next(model.parameters()).device
    prefixes = [""]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(hp.context_seed)
        for starter in hp.context_starters:
            ids = tok(starter, return_tensors="pt")["input_ids"].to(device)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=hp.context_length,
                do_sample=True,
                top_k=5,
                top_p=1.0,
                temperature=1.0,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
            text = tok.decode(out[0], skip_special_tokens=True)
            prefixes.append(text.replace("{", " ").replace("}", " ") + ". ")
    return prefixes
