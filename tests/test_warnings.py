"""Our calls into transformers use its current API: an edit (prefix-KV-cached value optimisation,
context generation, covariance, keys) prints no deprecation warning on any family (issue 17, 8)."""

from __future__ import annotations

import copy
import warnings

import pipeline
from conftest import COUNTERFACT_RECORDS
from test_constrained import HP


def test_an_edit_raises_no_deprecation_warning(family_model, corpus_path, tmp_path):
    _, model, tok = family_model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipeline.edit(model, tok, copy.deepcopy(COUNTERFACT_RECORDS[:2]), method="pmet", hparams=HP, corpus=corpus_path,
                      cache_dir=tmp_path, progress=False)
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, deprecations
