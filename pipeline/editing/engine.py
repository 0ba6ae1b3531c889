"""``edit()``: validate, compute covariance, optimise target values, spread them over layers.

The same pipeline serves every method; the :class:`~pipeline.editing.methods.Method` spec decides
the sites, the written projections and the spread.  The model is modified while the spread runs
(keys and current values of higher layers must see the lower layers' updates) and restored
afterwards unless ``apply=True``; the returned deltas are exactly what replay adds, so
``W_base + delta`` reproduces the edited weights bit for bit.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.editing.context import context_prefixes
from pipeline.editing.covariance import Corpus, second_moments
from pipeline.editing.hparams import HParams, HParamsError
from pipeline.editing.keys import RequestKeys, site_values
from pipeline.editing.methods import REGIONS, SITE_ROLES, Method, get_method, site_position, site_region
from pipeline.editing.precision import working_copy
from pipeline.editing.requests import EditRequest, parse_requests, validate_batch
from pipeline.editing.spread import closed_form_update, spread_divisor
from pipeline.editing.tokens import encode_with_subject, target_ids
from pipeline.editing.values import (FullForward, OptimisationError, PrefixCachedForward, ValueProblem, ValueResult,
                                     optimise_values)
from pipeline.editing.workers import available_workers, fork_map
from pipeline.models.adapters import adapter_for
from pipeline.models.attention import attention_implementation
from pipeline.models.loading import cache_home, model_fingerprint

ENGINES = ("fast", "reference")
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
    """Everything checkable before any model work: layers, tokenisation of every prompt/target."""
    adapter = adapter_for(model)
    for layer in hp.layers + hp.high_layers:
        adapter.check_layer(model, layer)
    if method.two_region:
        if not hp.high_layers:
            raise HParamsError(f"method {method.name} needs high_layers (JEEP's high region)")
        if hp.high_clamp_norm_factor >= hp.clamp_norm_factor and method.region_sites("low"):
            raise HParamsError(f"method {method.name}: JEEP clamps need γ' > γ* (clamp_norm_factor "
                               f"{hp.clamp_norm_factor} ≤ high_clamp_norm_factor {hp.high_clamp_norm_factor})")
    from pipeline.editing.neighbors import check_neighbor_requests

    check_neighbor_requests(requests, hp.neighbors)
    for r in requests:
        encode_with_subject(tok, r.prompt, r.subject)
        target_ids(tok, r.target_new)


def edit(model, tokenizer, requests, method: str = "pmet", hparams: HParams | dict | None = None, *,
         apply: bool = False, engine: str = "fast", corpus: str | Path | Corpus | None = None,
         cache_dir: str | Path | None = None, fingerprint: str | None = None, progress: bool = True) -> EditResult:
    """Edit ``requests`` into ``model`` with ``method``; return the weight deltas and traces.

    The model is left unchanged unless ``apply`` is true.  ``engine='reference'`` optimises each
    request separately through full forwards (the oracle the fast batched engine is tested
    against).  ``cache_dir`` holds covariance entries (default: the editledger cache).
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
        corpus = corpus if isinstance(corpus, Corpus) else Corpus.from_file(corpus or default_corpus())
        cache = Path(cache_dir) if cache_dir is not None else cache_home() / "covariance"
        fp = fingerprint or model_fingerprint(model)
        targets = written_projections(spec, hp)
        covs, cov_ids = second_moments(model, tokenizer, adapter, fp, corpus, targets, hp.cov_max_length,
                                       hp.cov_max_texts, hp.cov_batch_tokens, hp.cov_dtype, cache, progress)
        timings["covariance_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        prefixes = context_prefixes(model, tokenizer, hp)
        timings["prefixes_s"] = time.perf_counter() - t0

        from pipeline.editing.iterate import run_edit
        from pipeline.editing.neighbors import select_neighbors

        t0 = time.perf_counter()
        chosen = select_neighbors(model, tokenizer, reqs, hp.neighbors) if hp.neighbors else None
        timings["neighbors_s"] = time.perf_counter() - t0
        if not spec.joint or hp.iterative:  # optimisation and spread interleave: one driver for both
            run = run_edit(model, tokenizer, adapter, reqs, prefixes, spec, hp, covs, apply=apply, engine=engine,
                           neighbors=chosen, timings=timings)
            values_all, layer_rows, deltas, iterations = run.values, run.layers, run.deltas, run.iterations
        else:
            t0 = time.perf_counter()
            values = compute_targets(model, tokenizer, adapter, reqs, prefixes, spec, hp, engine,
                                     neighbors=chosen.prompts if chosen else None, progress=progress)
            timings["values_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            deltas, layer_rows = spread_targets(model, tokenizer, adapter, reqs, prefixes, spec, hp, values, covs, apply)
            timings["spread_s"] = time.perf_counter() - t0
            values_all, iterations = [values], []
    finally:
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        model.train(was_training)
    traces = values_all[0].trace if len(values_all) == 1 else [row for v in values_all for row in v.trace]
    return EditResult(
        method=spec.name, hparams=hp, deltas=deltas, traces=traces, layers=layer_rows, prefixes=prefixes,
        covariance_ids={f"{role}@{layer}": cov_ids[(role, layer)] for role, layer in targets},
        steps=sum(v.steps for v in values_all).tolist(), timings=timings, applied=apply, iterations=iterations,
        editing_neighbors=chosen.indices if chosen else None, values=values_all,
    )


def written_projections(spec: Method, hp: HParams) -> list[tuple[str, int]]:
    """Every (role, layer) a method writes: the low region over ``layers``, the high over ``high_layers``."""
    return [(role, layer) for region in REGIONS for layer in region_layers(hp, region)
            for role, _ in spec.region_writes(region)]


def region_layers(hp: HParams, region: str) -> tuple[int, ...]:
    return hp.layers if region == "low" else hp.high_layers


def site_dims(model, adapter, spec_sites, hp: HParams) -> dict[str, int]:
    """Width of each site's vector (residual sites: the hidden size; others: the projection's output)."""
    out = {}
    for s in spec_sites:
        layer = region_layers(hp, site_region(s))[-1]
        out[s] = model.config.get_text_config().hidden_size if SITE_ROLES[s] == "block" else \
            adapter.in_out_dims(model, SITE_ROLES[s], layer)[1]
    return out


def compute_targets(model, tok, adapter, reqs, prefixes, spec: Method, hp: HParams, engine: str = "fast",
                    sites: tuple[str, ...] | None = None, neighbors: list | None = None,
                    progress: bool = False) -> ValueResult:
    """Phase 1: the target value of every request at every site (``sites``: a subset, for
    separate optimisation); ``neighbors[i]``: request i's (template, subject, true object) prompts."""
    sites = tuple(sites or spec.sites)
    layer = hp.layers[-1]
    high = hp.high_layers[-1] if hp.high_layers else None
    dims = site_dims(model, adapter, sites, hp)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    build = lambda rs, nbs: ValueProblem.build(tok, rs, prefixes, nbs, hp.neighbor_prefixes)  # noqa: E731
    work = working_copy(model, hp.v_dtype)
    with attention_implementation(work, hp.v_attention):
        if engine == "fast":
            def run(part: slice) -> ValueResult | OptimisationError:
                problem = build(reqs[part], neighbors[part] if neighbors else None)
                try:  # returned, not raised: the failures of every slice are reported together
                    return optimise_values(PrefixCachedForward(work, adapter, problem, layer, sites, pad, high), sites,
                                           dims, hp, progress and part.start == 0, part.start)  # bar: caller only
                except OptimisationError as exc:
                    return exc

            workers = value_workers(work, hp, len(reqs))
            parts = fork_map(run, even_slices(len(reqs), workers)) if workers > 1 else [run(slice(0, len(reqs)))]
            failed = [p for p in parts if isinstance(p, OptimisationError)]
            if failed:
                raise OptimisationError.merge(failed)
            result = concat_values(parts, sites)
        else:
            parts = []
            for i, r in enumerate(tqdm(reqs, desc="values (per request)", unit="request", disable=not progress)):
                problem = build([r], [neighbors[i]] if neighbors else None)  # the reference code's per-request loop
                parts.append(optimise_values(FullForward(work, adapter, problem, layer, sites, pad, high), sites, dims,
                                             hp, first_request=i))
            result = concat_values(parts, sites)
    if work is not model:
        # δ was found on a cast copy; the target is the model's own value plus δ, so the spread
        # does not also write the cast's rounding error into the weights
        with torch.no_grad():
            init = {s: site_values(model, tok, adapter, reqs, s, region_layers(hp, site_region(s))[-1]).to(result.deltas[s].dtype)
                    for s in sites}
        result = ValueResult({s: init[s] + result.deltas[s] for s in sites}, init, result.deltas, result.steps,
                             result.trace)
    return result


def value_workers(model, hp: HParams, n_requests: int) -> int:
    """Processes for value optimisation: ``hp.v_workers`` on a CPU (at most one per request)."""
    if next(model.parameters()).device.type != "cpu":
        return 1
    return max(1, min(available_workers(hp.v_workers), n_requests))


def even_slices(n: int, k: int) -> list[slice]:
    """``k`` contiguous slices of ``range(n)`` whose sizes differ by at most one."""
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def concat_values(parts: list[ValueResult], sites: tuple[str, ...]) -> ValueResult:
    """One result from the results of consecutive slices of a batch (their traces already carry
    batch indices: ``optimise_values(first_request=…)``)."""
    cat = lambda attr: {s: torch.cat([getattr(p, attr)[s] for p in parts]) for s in sites}  # noqa: E731
    return ValueResult(cat("targets"), cat("init"), cat("deltas"), torch.cat([p.steps for p in parts]),
                       [row for p in parts for row in p.trace])


@torch.no_grad()
def spread_targets(model, tok, adapter, reqs, prefixes, spec: Method, hp: HParams, values: ValueResult,
                   covs: dict, apply: bool, regions: tuple[str, ...] = REGIONS) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Phase 2: write each critical layer, lowest first (the low region, then JEEP's high region),
    recomputing keys and current values with the current weights; returns the deltas
    (``W_base + Δ`` bit-exact) and per-layer norms."""
    plan = [(region, i, layer, role, site) for region in regions for i, layer in enumerate(region_layers(hp, region))
            for role, site in spec.region_writes(region)]
    written = {adapter.parameter_name(role, layer): (role, layer) for _, _, layer, role, _ in plan}
    originals = {name: adapter.module(model, role, layer).weight.detach().clone() for name, (role, layer) in written.items()}
    rows = []
    readers: dict[str, RequestKeys] = {}  # per token position: keys of successive layers, each read resumed
    try:
        for region, i, layer, role, site in plan:
            layers = region_layers(hp, region)
            remaining, last, position = len(layers) - i, layers[-1], site_position(site)
            divisor = spread_divisor(spec.region_spread(region), remaining)
            lam = hp.high_mom2_update_weight if region == "high" and hp.high_mom2_update_weight else hp.mom2_update_weight
            if position not in readers:
                readers[position] = RequestKeys(model, tok, adapter, reqs, prefixes, position)
            keys = readers[position](role, layer)
            current = site_values(model, tok, adapter, reqs, site, last)
            resid = (values.targets[site] - current) / divisor
            upd = closed_form_update(keys, resid, covs[(role, layer)], lam)
            if not torch.isfinite(upd).all():
                raise FloatingPointError(f"non-finite update at layer {layer} ({role}); check λ and the covariance")
            w = adapter.weight(model, role, layer)
            w.add_(upd.to(w.dtype))
            rows.append({"layer": layer, "role": role, "site": site, "divisor": divisor,
                         "key_norm": float(keys.norm(dim=-1).mean()), "resid_norm": float(resid.norm(dim=-1).mean()),
                         "target_gap_norm": float((values.targets[site] - current).norm(dim=-1).mean()),
                         "update_norm": float(upd.norm()), **({"region": region} if spec.two_region else {})})
        deltas = {}
        for name, (role, layer) in written.items():
            param = adapter.module(model, role, layer).weight
            deltas[name] = (param.detach() - originals[name]).cpu()
            param.copy_(originals[name] + deltas[name].to(param.device))  # the replayable state
    except BaseException:
        apply = False
        raise
    finally:
        if not apply:
            for name, (role, layer) in written.items():
                adapter.module(model, role, layer).weight.copy_(originals[name])
    return deltas, rows


@torch.no_grad()
def apply_deltas(model, deltas: dict[str, torch.Tensor], sign: int = 1) -> None:
    """Add (``sign=1``) or subtract recorded deltas in place; ``W + Δ`` is exactly the edited state."""
    params = dict(model.named_parameters())
    for name, d in deltas.items():
        if name not in params:
            raise KeyError(f"delta for unknown parameter {name!r}")
        p = params[name]
        if p.shape != d.shape:
            raise ValueError(f"delta for {name} has shape {tuple(d.shape)}, parameter has {tuple(p.shape)}")
        p.add_(d.to(p.device, p.dtype), alpha=sign)
