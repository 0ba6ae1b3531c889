"""Benchmark 2 (issue 6): the cost of the key covariance per token, against a forward pass.

Modes, all on the default model over the DVC-verified WikiText sample, layers of the bundled
hyper-parameters (1-5 for SmolLM2-135M):

* ``forward``: the bare forward pass truncated after the last edited layer, no statistics:
  the floor any covariance pass built on it can reach;
* ``covariance``: :func:`compute_second_moments` (one truncated pass for every layer, per-batch
  products, float64 accumulation), in float32 and in bfloat16 (``cov_dtype``);
* ``naive``: what public implementations do: one *full* forward per edited layer, products in
  float32 — timed on ``--naive-tokens`` tokens and reported per token (the full run takes half
  an hour here).

Also reports how far the bfloat16 covariance is from the float32 one (relative Frobenius norm)
per layer, and with ``--edit-check N`` what that does to an edit: the same PMET targets of N
CounterFact dev requests spread with either covariance (delta difference, metrics).  Medians over
``--repeat`` runs.  ``--no-timing`` skips the timings and takes both covariances from the
engine's cache (for the comparison and the edit check only).

    python benchmarks/covariance.py --repeat 3 --edit-check 50 --out benchmarks/results/covariance.json
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import typer

from pipeline.editing.context import context_prefixes
from pipeline.corpus import Corpus, windows
from pipeline.editing.covariance import compute_second_moments, cut_of, second_moments
from pipeline.editing.driver import Optimise, Replay, drive
from pipeline.editing.engine import default_corpus
from pipeline.editing.hooks import hooks, record_input, run_truncated, stop_after
from pipeline.editing.hparams import load_hparams
from pipeline.editing.methods import get_method
from pipeline.requests import parse_requests
from pipeline.evaluation.protocols import evaluate
from pipeline.editing.precision import working_copy
from pipeline.models.adapters import adapter_for
from pipeline.models.loading import cache_home, load_model

app = typer.Typer(add_completion=False)
COUNTERFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "multi_counterfact_dev.json"


def _batches(chunks: list[list[int]], batch_tokens: int):
    width = max(len(c) for c in chunks)
    per = max(1, batch_tokens // width)
    for start in range(0, len(chunks), per):
        batch = chunks[start : start + per]
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, c in enumerate(batch):
            ids[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = 1
        yield ids, mask


@torch.no_grad()
def _forward_only(model, adapter, chunks, top: int, batch_tokens: int) -> None:
    backbone = adapter.module(model, "backbone")
    with hooks([stop_after(adapter.module(model, "block", top))]):
        for ids, mask in _batches(chunks, batch_tokens):
            run_truncated(lambda: backbone(input_ids=ids, attention_mask=mask, use_cache=False))


@torch.no_grad()
def _naive(model, adapter, chunks, targets, batch_tokens: int) -> None:
    """One full forward per layer, as in the public reference code."""
    backbone = adapter.module(model, "backbone")
    for role, layer in targets:
        store: dict = {}
        acc = None
        with hooks([record_input(adapter.module(model, role, layer), store, "k")]):
            for ids, mask in _batches(chunks, batch_tokens):
                backbone(input_ids=ids, attention_mask=mask, use_cache=False)
                k = store["k"].reshape(-1, store["k"].shape[-1])[mask.reshape(-1).bool()]
                prod = (k.T @ k).double()
                acc = prod if acc is None else acc.add_(prod)


def _timed(fn, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(runs), "runs_s": runs}


@app.command()
def main(repeat: int = 3, naive_tokens: int = 16384, model: str = "smollm2-135m-instruct",
         hparams: str = "smollm2-135m-instruct", out: Path = Path("benchmarks/results/covariance.json"),
         max_chunks: int = 0, edit_check: int = 0, timing: bool = True):
    lm = load_model(model)
    hp = load_hparams(hparams, "pmet")
    adapter = adapter_for(lm.model)
    corpus = Corpus.from_file(default_corpus())
    chunks = list(windows(corpus, lm.tokenizer, cut_of(hp)))
    if max_chunks:
        chunks = chunks[:max_chunks]
    n_tokens = sum(len(c) for c in chunks)
    targets = [("mlp_out", layer) for layer in hp.layers]
    top = max(hp.layers)
    res: dict = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                             "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
                 "model": model, "layers": list(hp.layers), "tokens": n_tokens, "chunks": len(chunks),
                 "batch_tokens": hp.cov_batch_tokens, "repeat": repeat, "modes": {}}
    covs = {}
    if timing:
        for dtype in ("float32", "bfloat16"):
            work = working_copy(lm.model, dtype)
            res["modes"][f"forward_{dtype}"] = _timed(lambda: _forward_only(work, adapter, chunks, top, hp.cov_batch_tokens), repeat)

            def cov(work=work, dtype=dtype):
                covs[dtype] = compute_second_moments(work, adapter, chunks, targets, hp.cov_batch_tokens, progress=False)

            res["modes"][f"covariance_{dtype}"] = _timed(cov, repeat)
            print(dtype, res["modes"][f"forward_{dtype}"]["median_s"], res["modes"][f"covariance_{dtype}"]["median_s"], flush=True)
        naive_chunks, total = [], 0
        for c in chunks:
            if total >= naive_tokens:
                break
            naive_chunks.append(c)
            total += len(c)
        naive = _timed(lambda: _naive(lm.model, adapter, naive_chunks, targets, hp.cov_batch_tokens), repeat)
        res["modes"]["naive_float32"] = {**naive, "tokens": total,
                                         "extrapolated_full_s": naive["median_s"] * n_tokens / total}
        for mode in res["modes"].values():
            mode["ms_per_1k_tokens"] = 1e6 * mode["median_s"] / mode.get("tokens", n_tokens)
    else:  # the engine's cached covariances (computed once if missing), for the comparisons only
        for dtype in ("float32", "bfloat16"):
            covs[dtype], _ = second_moments(lm.model, lm.tokenizer, adapter, lm.fingerprint, corpus, targets,
                                            cut_of(hp), hp.cov_batch_tokens, dtype,
                                            cache_home() / "covariance", progress=True)
    res["bfloat16_vs_float32_rel_frobenius"] = {
        f"{r}@{layer}": float((covs["bfloat16"][(r, layer)] - covs["float32"][(r, layer)]).norm()
                              / covs["float32"][(r, layer)].norm()) for r, layer in targets}
    if edit_check:
        res["edit_check"] = _edit_check(lm, adapter, hp, covs, edit_check)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


def _edit_check(lm, adapter, hp, covs: dict, n: int) -> dict:
    """Spread the same PMET targets of ``n`` CounterFact dev requests with the float32 and with the
    bfloat16 covariance: how different are the weight deltas and the edit's metrics?"""
    spec = get_method("pmet")
    reqs = parse_requests(json.loads(COUNTERFACT.read_text())[:n])
    prefixes = context_prefixes(lm.model, lm.tokenizer, hp)
    values = drive(lm.model, lm.tokenizer, adapter, reqs, prefixes, spec, hp, {}, Optimise(), apply=False,
                   spread_last=False).values
    out: dict = {"requests": f"counterfact dev 0-{n - 1}", "v_dtype": hp.v_dtype}
    deltas = {}
    for dtype, c in covs.items():
        m = copy.deepcopy(lm.model)
        deltas[dtype] = drive(m, lm.tokenizer, adapter, reqs, prefixes, spec, hp, c, Replay(values), apply=True).deltas
        post, _ = evaluate(m, lm.tokenizer, reqs)
        out[f"post_{dtype}"] = {k: post[k] for k in ("efficacy", "generalization", "specificity", "score")}
    out["delta_rel_diff"] = {name: float((deltas["bfloat16"][name] - d).norm() / d.norm()) for name, d in deltas["float32"].items()}
    return out


if __name__ == "__main__":
    app()
