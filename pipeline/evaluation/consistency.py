"""Consistency: TF-IDF cosine between a record's generations and reference text about the new object.

ROME/MEMIT ("reference score") compare the generations from a record's ``generation_prompts`` with
Wikipedia snippets about other subjects that *do* have the new object ``o*`` (TF-IDF fitted on
Wikipedia): text that talks like the edited fact scores high.  Those snippets and that IDF table
are not available here (see ``../shared/data/README.md``), so this module is generic and the
evaluation suite chooses and names its reference (:data:`pipeline.evaluation.suite.CONSISTENCY_KEY`).
Numbers computed with another reference are **not comparable** with the papers'.

The vectoriser reproduces scikit-learn's ``TfidfVectorizer`` defaults, which the reference code
used: lower-case, tokens of ≥ 2 word characters, smoothed IDF ``ln((1 + N) / (1 + df)) + 1``, raw
term counts, L2 normalisation; words outside the fitted vocabulary are ignored.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Mapping

TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")


def tokens(text: str) -> list[str]:
    return TOKEN_RE.findall(text.lower())


@dataclass(frozen=True)
class Tfidf:
    idf: Mapping[str, float]

    @classmethod
    def fit(cls, documents: Iterable[str]) -> Tfidf:
        df: Counter[str] = Counter()
        n = 0
        for doc in documents:
            df.update(set(tokens(doc)))
            n += 1
        if not n:
            raise ValueError("TF-IDF needs at least one document to fit")
        return cls({w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()})

    def vector(self, text: str) -> dict[str, float]:
        """L2-normalised TF-IDF weights of ``text`` (empty if no word is in the vocabulary)."""
        tf = Counter(w for w in tokens(text) if w in self.idf)
        vec = {w: c * self.idf[w] for w, c in tf.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {w: v / norm for w, v in vec.items()} if norm else {}

    def cosine(self, a: str, b: str) -> float:
        """Cosine similarity of the two texts' vectors; 0 when either has no known word."""
        va, vb = self.vector(a), self.vector(b)
        if len(vb) < len(va):
            va, vb = vb, va
        return sum(v * vb.get(w, 0.0) for w, v in va.items())
