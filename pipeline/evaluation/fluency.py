"""Fluency: the weighted n-gram entropy of generated text (ROME/MEMIT's "generation entropy").

An edit that damages the model shows up in free generation before it shows up in teacher-forced
probabilities: the model starts repeating itself.  ROME/MEMIT measure that as, per text,

    mean(2/3 · H₂, 4/3 · H₃),   Hₙ = entropy in bits of the text's n-gram frequency distribution,

averaged over the generations of a record, then over records.  The reference code splits words
with ``nltk.word_tokenize`` (which needs a downloaded model); we split with a regular expression
(runs of word characters; every other non-space character alone).  The two agree on ordinary
prose and differ on contractions ("don't" → do, n't vs don, ', t), so absolute values are close to,
not identical with, published ones.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence

WORD_RE = re.compile(r"\w+|[^\w\s]")
NGRAM_WEIGHTS: Mapping[int, float] = {2: 2 / 3, 3: 4 / 3}


def words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def ngram_entropy_bits(tokens: Sequence[str], n: int) -> float:
    """Entropy (bits) of the frequency distribution of the ``n``-grams of ``tokens`` (0 if none)."""
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def ngram_entropy(text: str, weights: Mapping[int, float] = NGRAM_WEIGHTS) -> float:
    """ROME/MEMIT's per-text score: the mean over n of ``weight[n] · Hₙ``."""
    tokens = words(text)
    return sum(w * ngram_entropy_bits(tokens, n) for n, w in weights.items()) / len(weights)


def fluency(texts: Sequence[str]) -> float:
    """Mean per-text n-gram entropy (the per-record number; records are averaged by the caller)."""
    if not texts:
        raise ValueError("fluency needs at least one text")
    return sum(ngram_entropy(t) for t in texts) / len(texts)
