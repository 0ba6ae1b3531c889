"""The value-optimisation problem of a batch: every prompt it runs, tokenised once.

For each request the rewriting prompts are ``prefix_j + prompt(subject) + o*[:-1]`` (teacher
forcing: the answer's tokens are predicted one after the other), then one KL prompt
``"{subject} is a"`` cut after the subject's last token where the KL is read, then (neighbour-
assisted editing) the neighbour prompts answered with the true object.  The tensors index targets
and sequences so that one batched forward serves every request.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.tokens import Encoded, encode_with_subject, target_ids
from pipeline.requests import EditRequest

KL_TEMPLATE = "{} is a"


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

