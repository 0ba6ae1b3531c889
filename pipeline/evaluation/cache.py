"""The evaluation cache: what a model state answers, kept by content so that nothing is computed twice.

A pair's teacher-forced scores, a generation's continuation and a perplexity depend only on the
model's weights (its fingerprint), the token ids asked about, the decoding settings, and the
numerics (device, dtype, library versions, this code's :data:`VERSION`).  Scores do not depend, in
any bit, on the other pairs scored beside them (:mod:`pipeline.evaluation.batching`); a sampled
continuation could, in the rare draw that falls on a probability boundary
(:mod:`pipeline.evaluation.generation`), and the cache then keeps the first one computed.  So every
result is stored under the hash of exactly those inputs, and an evaluation of the unedited model (every batch's ``base``
state, the unedited rows of the benchmarks, ME-PPL-50 of the base model) or of any ledger state
seen before reads it back instead of running the model.  Keys are over token ids, not text, so a
different tokenizer can never read another's numbers.

Storage: one SQLite file (``cache_home()/evaluation/cache.sqlite3``, or ``$EDITLEDGER_EVAL_CACHE``;
``off`` disables it), values as JSON.  Float32 numbers survive the JSON round trip exactly, so a
cached result is bit-identical to a computed one.  Writers commit whole transactions, so a killed
process leaves either all of a call's results or none; entries are never updated, only added, and
removing the file loses nothing but time.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.evaluation.scoring import Pair, Scores

VERSION = 1  # bump when a change to the evaluation code changes any cached number
OFF = "off"


def default_path() -> Path | None:
    """``$EDITLEDGER_EVAL_CACHE`` (a file, or ``off``), else ``<editledger cache>/evaluation/cache.sqlite3``."""
    from pipeline.models.loading import cache_home

    env = os.environ.get("EDITLEDGER_EVAL_CACHE")
    if env == OFF:
        return None
    return Path(env) if env else cache_home() / "evaluation" / "cache.sqlite3"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def numerics(model) -> dict:
    """What besides the weights decides the last bits of a forward."""
    p = next(model.parameters())
    return {"version": VERSION, "device": p.device.type, "dtype": str(p.dtype), "torch": torch.__version__,
            "machine": platform.machine(), "attn": getattr(model.config, "_attn_implementation", None)}


class StateCache:
    """The cached results of one model state (``fingerprint``: :func:`~pipeline.models.loading.model_fingerprint`)."""

    def __init__(self, path: Path, fingerprint: str, model):
        self.path = path
        self.state = _digest({"weights": fingerprint, **numerics(model)})
        self.hits = self.misses = 0
        if distributed.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("CREATE TABLE IF NOT EXISTS results (state TEXT, kind TEXT, key TEXT, value TEXT, "
                           "PRIMARY KEY (state, kind, key))")

    @classmethod
    def of(cls, model, fingerprint: str | None, path: Path | None = None) -> StateCache | None:
        """The cache of a state, or None when there is no fingerprint or the cache is off."""
        path = path if path is not None else default_path()
        return None if fingerprint is None or path is None else cls(path, fingerprint, model)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=600)

    def cached(self, kind: str, items: Sequence, compute: Callable[[list], list]) -> list:
        """The result of every item (each a JSON-able description of one question): read where
        present, ``compute``\\ d (on the missing items, in their order) and stored otherwise."""
        keys = [_digest(x) for x in items]
        # under torchrun rank 0 alone reads and writes the file; every rank gets what it read, so
        # all compute the same missing items together (their computation is sharded)
        found: dict[str, str] = distributed.broadcast(self._read(kind, keys) if distributed.is_main() else None,
                                                      "evaluation cache look-up")
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        todo = [i for k, i in first.items() if k not in found]
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            values = compute([items[i] for i in todo])
            new = {keys[i]: json.dumps(v) for i, v in zip(todo, values)}
            if distributed.is_main():
                with self._connect() as db:
                    db.executemany("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?)",
                                   [(self.state, kind, k, v) for k, v in new.items()])
            found.update(new)
        return [json.loads(found[k]) for k in keys]

    def _read(self, kind: str, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with self._connect() as db:
            unique = list(dict.fromkeys(keys))
            for s in range(0, len(unique), 500):  # SQLite's bound-parameter limit
                part = unique[s : s + 500]
                q = f"SELECT key, value FROM results WHERE state = ? AND kind = ? AND key IN ({','.join('?' * len(part))})"
                found.update(db.execute(q, [self.state, kind, *part]).fetchall())
        return found

    def scores(self, pairs: list[Pair], compute: Callable[[list[Pair]], Scores]) -> Scores:
        def run(todo: list) -> list:
            sc = compute([(tuple(p), tuple(a)) for p, a in todo])
            return [[float(sc.mean_logprob[i]), float(sc.token_correct[i]), int(sc.n_tokens[i]), int(sc.first_rank[i])]
                    for i in range(len(todo))]

        rows = self.cached("score", [[list(p), list(a)] for p, a in pairs], run)
        return Scores(torch.tensor([r[0] for r in rows], dtype=torch.float32),
                      torch.tensor([r[1] for r in rows], dtype=torch.float32),
                      torch.tensor([r[2] for r in rows], dtype=torch.long),
                      torch.tensor([r[3] for r in rows], dtype=torch.long))
