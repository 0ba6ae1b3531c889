"""Tokenisation helpers shared by keys, values and evaluation.

The one subtle thing is locating the subject's last token.  Character offsets from a fast
tokenizer make that exact whatever the BPE merges do at the subject's boundary; slow tokenizers
fall back to tokenising the text up to the end of the subject (the reference code's approach).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.requests import RequestError


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    subject_last: int  # index into ids of the subject's last token


def target_ids(tok, target: str) -> list[int]:
    """Token ids of an answer as it continues a prompt (a leading space, no special tokens)."""
    text = target if target[:1].isspace() else " " + target
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise RequestError(f"target {target!r} tokenizes to nothing")
    return ids


def encode_prompt(tok, prompt: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's own special tokens (e.g. Gemma's <bos>)."""
    return tok(prompt)["input_ids"]


def encode_with_subject(tok, template: str, subject: str) -> Encoded:
    """Encode ``template`` (one ``{}``) filled with ``subject``; locate the subject's last token."""
    if template.count("{}") != 1:
        raise RequestError(f"template must contain '{{}}' exactly once: {template!r}")
    pre, post = template.split("{}")
    text = pre + subject + post
    end = len(pre) + len(subject)  # first character after the subject
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        covering = [i for i, (s, e) in enumerate(offsets) if e > s and s < end]
        if not covering:
            raise RequestError(f"subject {subject!r} not found among the tokens of {text!r}")
        return Encoded(ids, covering[-1])
    ids = tok(text)["input_ids"]
    upto = tok(pre + subject)["input_ids"]
    return Encoded(ids, len(upto) - 1)


def pad_right(seqs: list[list[int]], pad_id: int = 0):
    """Right-padded ``[B, T]`` ids and mask; causal attention never lets real tokens see pads."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
