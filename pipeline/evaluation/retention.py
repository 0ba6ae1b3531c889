"""Which earlier edits are evaluated again after a batch (lifelong retention), and why those.

After batch t every edit of an earlier batch that is still active should be checked again: later
batches overwrite the same MLP weights and can undo it.  Doing all of them after every batch costs
O(t²) over a history, so the cadence is a parameter: a fixed-size sample every batch, everything
every ``full_every`` batches.  The sample is a seeded hash ranking of the requests' canonical
content, so it is the same whichever order the ledger lists them in, it does not depend on which
batch asks, and a request that is sampled once tends to stay sampled while the pool grows (its
rank does not change; only requests with a smaller hash displace it), which makes the retention
curve follow mostly the same requests rather than a new random set each time.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class RetentionSettings:
    sample: int | None = 100  # None: every earlier active request
    full_every: int = 10  # batches with seq % full_every == 0 evaluate all; 0: never
    generation: bool = True  # also fluency/consistency for the retained requests
    seed: int = 0


@dataclass(frozen=True)
class Candidate:
    """An earlier active request: its batch directory, its index there, its canonical JSON."""

    batch: str
    index: int
    key: str


@dataclass(frozen=True)
class RetentionPlan:
    mode: str  # "none" (nothing earlier is active), "all" or "sample"
    chosen: tuple[Candidate, ...]
    n_available: int
    settings: RetentionSettings

    def describe(self) -> dict:
        """What metrics.json records, so that every retention number says how it was obtained."""
        return {"mode": self.mode, "n_available": self.n_available, "n_evaluated": len(self.chosen),
                "batches": sorted({c.batch for c in self.chosen}), **asdict(self.settings)}


def _rank(seed: int, c: Candidate) -> tuple[str, str, int]:
    return hashlib.sha256(f"{seed}\0{c.key}".encode()).hexdigest(), c.batch, c.index


def plan(seq: int, candidates: Sequence[Candidate], settings: RetentionSettings) -> RetentionPlan:
    """The earlier requests batch ``seq`` evaluates, in the order they were given."""
    if not candidates:
        return RetentionPlan("none", (), 0, settings)
    full = settings.sample is None or (settings.full_every and seq % settings.full_every == 0)
    if full or settings.sample >= len(candidates):
        return RetentionPlan("all", tuple(candidates), len(candidates), settings)
    keep = set(sorted(candidates, key=lambda c: _rank(settings.seed, c))[: settings.sample])
    return RetentionPlan("sample", tuple(c for c in candidates if c in keep), len(candidates), settings)
