"""``edit()``: validate, compute covariance, find target values, spread them over layers.

The same pipeline serves every method; the :class:`~pipeline.editing.methods.Method` spec decides
the regions, the written projections and the spread, and :mod:`pipeline.editing.driver` runs it.
The model is left unchanged unless ``apply=True``; the returned deltas are exactly what replay
adds, so ``W_base + delta`` reproduces the edited weights bit for bit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.editing.context import context_prefixes
from pipeline.corpus import Corpus
from pipeline.editing.covariance import cut_of, second_moments, spectra
from pipeline.editing.driver import Optimise, Replay, drive
from pipeline.editing.hparams import HParams, HParamsError
from pipeline.editing.methods import Method, get_method, sites_of
from pipeline.editing.neighbors import check_neighbor_requests, select_neighbors
from pipeline.editing.spread import layer_key, written_projections
from pipeline.editing.solvers import SOLVERS
from pipeline.editing.targets import ENGINES, anchor_norms
from pipeline.tokens import encode_with_subject, target_ids
from pipeline.models.adapters import adapter_for
from pipeline.models.loading import cache_home, model_fingerprint
from pipeline.requests import EditRequest, parse_requests, validate_batch

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class EditResult:
    method: str
    hparams: HParams
    deltas: dict[str, torch.Tensor]  # parameter name → W_edited − W_base, in the parameter's layout
    traces: list[dict]  # one row per (request, optimisation step)
    layers: list[dict]  # one row per written (layer, role): norms of keys, residual and update
    prefixes: list[str]
    covariance_ids: dict[str, str]  # "role@layer" → covariance cache key id
    steps: list[int]  # optimisation steps per request (summed over passes and iterations)
    timings: dict[str, float] = field(default_factory=dict)
    applied: bool = False
    # iterative editing: one row per iteration (target perplexities and |Δp|, see iterate.py)
    iterations: list[dict] = field(default_factory=list)
    # neighbour-assisted editing: per request, the indices into its record's neighborhood_prompts
    # used in the value loss; evaluation leaves them out of that request's specificity
    editing_neighbors: list[list[int]] | None = None
    values: list = field(default_factory=list, repr=False)  # ValueResult of every pass, in order
    # "role@layer" → [N, d_in]: the batch's keys at each written layer, on the edited model
    keys: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def default_corpus() -> Path:
    """``$EDITLEDGER_CORPUS``, else the DVC-verified copy in ``data/``, else the shared mirror."""
    candidates = [os.environ.get("EDITLEDGER_CORPUS"), PROJECT_ROOT / "data" / "wikitext" / "wikitext2_raw_test.txt",
                  PROJECT_ROOT.parent / "shared" / "data" / "wikitext" / "wikitext2_raw_test.txt"]
    for c in candidates:
        if c and Path(c).exists():
            return Path(c)
    raise FileNotFoundError("no covariance corpus found: pass corpus= or set EDITLEDGER_CORPUS")


def _as_requests(requests) -> list[EditRequest]:
    if requests and all(isinstance(r, EditRequest) for r in requests):
        validate_batch(list(requests))
        return list(requests)
    return parse_requests(list(requests))


def _as_hparams(hparams) -> HParams:
    if isinstance(hparams, HParams):
        return hparams
    if isinstance(hparams, dict):
        return HParams.from_dict(hparams)
    raise HParamsError("hparams must be an HParams or a dict (see pipeline/hparams/*.yaml)")


def validate_inputs(model, tok, requests: list[EditRequest], method: Method, hp: HParams) -> None:
    """Everything checkable before any model work: layers, the method's settings, neighbour
    records, tokenisation of every prompt and target."""
    adapter = adapter_for(model)
    for layer in hp.layers + hp.high_layers:
        adapter.check_layer(model, layer)
    method.check(hp)
    check_neighbor_requests(requests, hp.neighbors)
    for r in requests:
        encode_with_subject(tok, r.prompt, r.subject)
        target_ids(tok, r.target_new)


def edit(model, tokenizer, requests, method: str = "pmet", hparams: HParams | dict | None = None, *,
         apply: bool = False, engine: str = "fast", corpus: str | Path | Corpus | None = None,
         cache_dir: str | Path | None = None, fingerprint: str | None = None, progress: bool = True,
         history: Mapping[str, torch.Tensor] | None = None, unedited=None, replay: Replay | None = None) -> EditResult:
    """Edit ``requests`` into ``model`` with ``method``; return the weight deltas and traces.

    The model is left unchanged unless ``apply`` is true.  ``engine='reference'`` optimises each
    request separately through full forwards (the oracle the fast batched engine is tested
    against).  ``cache_dir`` holds covariance entries (default: the editledger cache).
    ``history``: the update rule's state from earlier edits ("role@layer" → Σ K_pᵀ K_p, see
    :mod:`pipeline.editing.solvers`); it is read, never kept.  ``unedited``: the unedited model,
    whose value norms ``norm_anchor`` scales targets to (default: ``model`` itself, right for its
    first batch only).  ``replay``: targets an earlier ``edit()`` found for these requests
    (``Replay(result.values, result.prefixes)``), spread instead of optimised, so that a history can
    be rebuilt from its targets without the optimisation (what the ``apply`` stage does for a ledger).
    """
    spec = get_method(method)
    if hparams is None:
        raise HParamsError("hparams are required (e.g. load_hparams('smollm2-135m-instruct', method))")
    hp = _as_hparams(hparams)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINES}")
    reqs = _as_requests(requests)
    validate_inputs(model, tokenizer, reqs, spec, hp)
    adapter = adapter_for(model)
    timings: dict[str, float] = {}
    was_training = model.training
    grad_flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(False)
    try:
        t0 = time.perf_counter()
        corpus = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus or default_corpus())
        cache = Path(cache_dir) if cache_dir is not None else cache_home() / "covariance"
        fp = fingerprint or model_fingerprint(model)
        targets = written_projections(spec.resolve(hp))
        covs, cov_ids = second_moments(model, tokenizer, adapter, fp, corpus, targets, cut_of(hp),
                                       hp.cov_batch_tokens, hp.cov_dtype, cache, progress)
        timings["covariance_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prefixes = replay.prefixes if replay is not None and replay.prefixes is not None else \
            context_prefixes(model, tokenizer, hp)
        timings["prefixes_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        chosen = select_neighbors(model, tokenizer, reqs, hp.neighbors) if hp.neighbors else None
        timings["neighbors_s"] = time.perf_counter() - t0
        solver = SOLVERS[hp.solver]
        spec_ = spectra(covs, cov_ids, cache) if solver.uses_spectrum else None
        anchors = anchor_norms(unedited if unedited is not None else model, tokenizer, adapter, reqs,
                               sites_of(spec.resolve(hp))) if hp.norm_anchor and replay is None else None
        source = replay if replay is not None else Optimise(engine, chosen, progress, anchors)
        run = drive(model, tokenizer, adapter, reqs, prefixes, spec, hp, covs, source,
                    apply=apply, history=history, spectra=spec_, timings=timings)
    finally:
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return EditResult(
        method=spec.name, hparams=hp, deltas=run.deltas, traces=[row for v in run.values for row in v.trace],
        layers=run.layers, prefixes=prefixes, covariance_ids={layer_key(*t): cov_ids[t] for t in targets},
        steps=sum(v.steps for v in run.values).tolist(), timings=timings, applied=apply, iterations=run.iterations,
        editing_neighbors=chosen.indices if chosen else None, values=run.values, keys=run.keys,
    )
