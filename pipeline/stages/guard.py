"""The collapse guard of the ``apply`` stage: keep a batch that breaks the model out of the state.

An edit can make the requested facts come out right while wrecking the model ("model collapse":
perplexity on ordinary text shoots up).  With ``guard.max_ppl_ratio`` set in ``params.yaml`` the
apply stage measures the ME-PPL-50 perplexity (``data/me_ppl_50.parquet``, written by the data
stage) of the state *with* the batch, before its commit point, and compares it with the base
model's.  Above ``max_ppl_ratio`` × the base perplexity the batch is committed as a *refused*
entry: its deltas and the measurement are recorded (the refusal is part of the auditable
history and of the hash chain), but the state stays what it was, so the next batch builds on the
last good state.  Re-application batches of an exact drop are not judged: they recompute batches
that were accepted.

The base perplexity depends only on the base model and the texts, so it is computed once and then
taken from the most recent entry that recorded it for the same base fingerprint and texts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch

from pipeline.evaluation.perplexity import perplexity
from pipeline.ledger.atomic import sha256_json
from pipeline.ledger.entry import Entry
from pipeline.models.weights import apply_deltas, trial
from pipeline.stages.common import Project, base_model, me_ppl_texts

MAX_LENGTH = 256
BATCH_SIZE = 8


@dataclass(frozen=True)
class GuardVerdict:
    """What the guard measured and decided; ``decision()`` goes into the hashed entry content."""

    max_ppl_ratio: float
    base_ppl: float
    ppl: float
    texts_sha256: str
    max_length: int = MAX_LENGTH

    @property
    def ratio(self) -> float:
        return self.ppl / self.base_ppl

    @property
    def refused(self) -> bool:
        return not self.ratio <= self.max_ppl_ratio  # a NaN perplexity is refused too

    def decision(self) -> dict:
        return {"max_ppl_ratio": self.max_ppl_ratio, "refused": self.refused}

    def record(self) -> dict:
        """The measurement, for the manifest's metrics (``None`` for a non-finite perplexity)."""
        finite = lambda x: x if x == x and abs(x) != float("inf") else None  # noqa: E731
        return {**asdict(self), "base_ppl": finite(self.base_ppl), "ppl": finite(self.ppl), "ratio": finite(self.ratio),
                "refused": self.refused}


def recorded_base_ppl(chain: Sequence[Entry], base_fingerprint: str, texts_sha256: str) -> float | None:
    """The base perplexity an earlier entry measured on the same base model and texts, if any."""
    for e in reversed(chain):
        g = (e.metrics or {}).get("guard")
        if (g and g.get("texts_sha256") == texts_sha256 and g.get("max_length") == MAX_LENGTH
                and e.base_fingerprint == base_fingerprint):
            return g["base_ppl"]
    return None


@torch.no_grad()
def judge(project: Project, max_ppl_ratio: float, model, tok, deltas: Mapping[str, torch.Tensor],
          chain: Sequence[Entry], base_fingerprint: str) -> GuardVerdict:
    """Perplexity of ``model`` (in the parent state) plus ``deltas``, against the base model's.

    ``model`` is returned bit-for-bit as it was given (the edited parameters are copied back, not
    subtracted): the commit that follows checks its fingerprint.
    """
    texts = me_ppl_texts(project)
    sha = sha256_json(texts)
    base_ppl = recorded_base_ppl(chain, base_fingerprint, sha)
    if base_ppl is None:
        base_ppl = perplexity(base_model(project).model, tok, texts, MAX_LENGTH, BATCH_SIZE)
    with trial(model, deltas):
        apply_deltas(model, dict(deltas), 1)
        try:
            ppl = perplexity(model, tok, texts, MAX_LENGTH, BATCH_SIZE)
        except OverflowError:  # exp(mean NLL) beyond float range: as collapsed as it gets
            ppl = float("inf")
    return GuardVerdict(float(max_ppl_ratio), float(base_ppl), float(ppl), sha)
