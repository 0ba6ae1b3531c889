"""Benchmark 1 (issue 6): seconds per edit, naive per-request loop vs the engine, same requests.

Each configuration edits the same CounterFact dev requests into a fresh copy of the default model
as one batch, with the same covariance (cached beforehand, so not timed) and the same context
prefixes, then evaluates efficacy / generalisation / specificity.  Configurations (``--config``,
repeatable):

* ``naive``: the public implementations' structure: one request at a time, full forward of every
  prompt at every step, float32, the model's own (SDPA) attention (``engine='reference'``,
  ``v_dtype: float32``, ``v_attention: model``);
* ``fast-float32``: the batched engine (prefix KV cache, logits at targets only, per-request
  stopping) in float32, same attention kernel as ``naive``: the like-for-like oracle comparison;
* ``fast-bfloat16``: the same with δ optimised on a bfloat16 copy of the model;
* ``fast``: the engine with the bundled hyper-parameters as they are (bfloat16, eager attention);
* ``fast-steps15`` / ``fast-stop-at-argmax`` / ``fast-kl0.2``: the bundled setting with 15 steps,
  or with each request stopping as soon as its new object is the argmax (a KL threshold no request
  misses), or once it is the argmax and KL ≤ 0.2;
* ``fast-chunk25``: the bundled setting in chunks of 25 requests per forward/backward;
* ``fast-workers2`` / ``fast-workers1``: the bundled setting with δ optimised by two single-threaded
  processes, each on half of the requests, or by one process with torch's threads;
* ``fast-eager-workers1``: the bundled setting before grouped attention and value workers.

Time per edit = (values + spread) / n; keys are part of the spread phase.  ``--repeat`` runs each
configuration several times and reports the median; the first repeat is evaluated and the others
must write bit-identical weights (``repeats_bit_identical``).

    python benchmarks/engine_speed.py --n 100 --config naive --config fast-float32 --config fast \\
        --out benchmarks/results/engine_speed.json
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
from pipeline.corpus import Corpus
from pipeline.editing.covariance import cut_of, second_moments
from pipeline.editing.driver import Optimise, drive
from pipeline.editing.engine import default_corpus
from pipeline.editing.hparams import load_hparams
from pipeline.editing.methods import get_method
from pipeline.editing.spread import written_projections
from pipeline.requests import parse_requests
from pipeline.evaluation.protocols import evaluate
from pipeline.models.adapters import adapter_for
from pipeline.models.loading import cache_home, load_model

app = typer.Typer(add_completion=False)
COUNTERFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "multi_counterfact_dev.json"
# "naive" and "fast-float32"/"fast-bfloat16" keep the model's own attention kernel (SDPA), as the
# public implementations do; the bundled setting ("fast") optimises with eager attention
OWN_ATTENTION = {"v_attention": "model"}
CONFIGS = {"naive": ("reference", {"v_dtype": "float32", **OWN_ATTENTION}), "fast-float32": ("fast", {"v_dtype": "float32", **OWN_ATTENTION}),
           "fast-bfloat16": ("fast", {"v_dtype": "bfloat16", **OWN_ATTENTION}), "fast": ("fast", {}),
           # fewer optimisation steps (issue 6's step study, RESULTS.md): 15 fixed steps, or each request
           # stopping at the first step where o* is the argmax on all its rewriting prompts
           "fast-steps15": ("fast", {"v_num_grad_steps": 15}), "fast-stop-at-argmax": ("fast", {"kl_stop": 1e9}),
           # PMET's rule with a KL threshold this model reaches (0.01 is never met within 30 steps here)
           "fast-kl0.2": ("fast", {"kl_stop": 0.2}),
           # the chunking bundled before the 100-request chunks (v_batch_requests 25)
           "fast-chunk25": ("fast", {"v_batch_requests": 25}),
           # the bundled setting with value optimisation in 2 single-threaded processes / in one
           "fast-workers2": ("fast", {"v_workers": 2}), "fast-workers1": ("fast", {"v_workers": 1}),
           # the bundled setting before grouped attention and value workers (commit 99f0182)
           "fast-eager-workers1": ("fast", {"v_attention": "eager", "v_workers": 1})}
SHOWN = ("efficacy", "generalization", "specificity", "score", "efficacy_magnitude", "generalization_magnitude",
         "specificity_magnitude")


@app.command()
def main(n: int = 100, start: int = 0, method: str = "pmet", config: list[str] = typer.Option(["naive", "fast"]),
         repeat: int = 1, model: str = "smollm2-135m-instruct", hparams: str = "smollm2-135m-instruct",
         data: Path = COUNTERFACT, out: Path = Path("benchmarks/results/engine_speed.json")):
    unknown = [c for c in config if c not in CONFIGS]
    if unknown:
        raise typer.BadParameter(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    lm = load_model(model)
    base, tok = lm.model, lm.tokenizer
    adapter = adapter_for(base)
    spec = get_method(method)
    reqs = parse_requests(json.loads(data.read_text())[start : start + n])
    corpus = Corpus.from_file(default_corpus())
    t0 = time.perf_counter()
    pre, _ = evaluate(base, tok, reqs)
    eval_s = time.perf_counter() - t0
    res: dict = {"machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                             "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
                 "model": model, "method": spec.name, "requests": f"counterfact dev {start}-{start + n - 1}", "n": n,
                 "repeat": repeat, "eval_s": eval_s, "pre": {k: pre[k] for k in SHOWN}, "configs": {}}
    for name in config:
        engine, overrides = CONFIGS[name]
        hp = load_hparams(hparams, spec.hparams_from, overrides)
        targets = written_projections(spec.resolve(hp))
        covs, _ = second_moments(base, tok, adapter, lm.fingerprint, corpus, targets, cut_of(hp),
                                 hp.cov_batch_tokens, hp.cov_dtype, cache_home() / "covariance",
                                 progress=False)
        prefixes = context_prefixes(base, tok, hp)
        runs, post, first, identical = [], None, None, True
        for _ in range(repeat):
            m = copy.deepcopy(base)
            timings: dict = {}
            run = drive(m, tok, adapter, reqs, prefixes, spec, hp, covs, Optimise(engine), apply=True, timings=timings)
            deltas = run.deltas
            runs.append({**timings, "mean_steps": float(run.values[0].steps.float().mean())})
            if first is None:  # the repeats must write the same weights: evaluated once, compared after
                first = deltas
                post, _ = evaluate(m, tok, reqs)
            else:
                identical &= all(torch.equal(first[k], deltas[k]) for k in first)
            del m
        per_edit = [(r["values_s"] + r["spread_s"]) / n for r in runs]
        res["configs"][name] = {"engine": engine, "v_dtype": hp.v_dtype, "v_attention": hp.v_attention,
                                "s_per_edit_median": statistics.median(per_edit),
                                "v_workers": hp.v_workers, "repeats_bit_identical": identical if repeat > 1 else None,
                                "runs": runs, "post": {k: post[k] for k in SHOWN}}
        print(name, json.dumps(res["configs"][name]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    if "naive" in res["configs"]:
        ref = res["configs"]["naive"]["s_per_edit_median"]
        for c in res["configs"].values():
            c["speedup_vs_naive"] = ref / c["s_per_edit_median"]
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    app()
