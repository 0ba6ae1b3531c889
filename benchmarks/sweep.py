"""Hyper-parameter sweep for a model with no published setting (documented in sweep_*.md).

For each (method, edited layers, value-optimisation settings) the target values are optimised
once and then spread with every λ in the grid (the values do not depend on λ), so a grid costs
one optimisation per row group.  Requests come from a slice of CounterFact dev that is disjoint
from the slice used for the reported results.

    python benchmarks/sweep.py --start 1000 --n 30 --grid benchmarks/sweep_grid.json --out benchmarks/results/sweep.jsonl
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import typer

from pipeline.editing.context import context_prefixes
from pipeline.corpus import Corpus
from pipeline.editing.covariance import cut_of, second_moments
from pipeline.editing.driver import Optimise, Replay, drive
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


@app.command()
def main(grid: Path, out: Path, start: int = 1000, n: int = 30, model: str = "smollm2-135m-instruct",
         hparams: str = "smollm2-135m-instruct", data: Path = COUNTERFACT):
    lm = load_model(model)
    m, tok = lm.model, lm.tokenizer
    adapter = adapter_for(m)
    reqs = parse_requests(json.loads(data.read_text())[start : start + n])
    pre, _ = evaluate(m, tok, reqs)
    base_state = {k: v.clone() for k, v in m.state_dict().items()}
    corpus = Corpus.from_file(default_corpus())
    out.parent.mkdir(parents=True, exist_ok=True)
    for group in json.loads(grid.read_text()):
        spec = get_method(group["method"])
        lams = group.pop("lambdas")
        hp = load_hparams(hparams, spec.hparams_from, {k: v for k, v in group.items() if k != "method"})
        targets = written_projections(spec.resolve(hp))
        covs, _ = second_moments(m, tok, adapter, lm.fingerprint, corpus, targets, cut_of(hp),
                                 hp.cov_batch_tokens, hp.cov_dtype, cache_home() / "covariance", progress=False)
        prefixes = context_prefixes(m, tok, hp)
        t0 = time.perf_counter()
        (values,) = drive(m, tok, adapter, reqs, prefixes, spec, hp, {}, Optimise(), apply=False, spread_last=False).values
        t_values = time.perf_counter() - t0
        opt_ok = sum(1 for r in values.trace if r["step"] == values.steps[r["request"]] - 1 and r["argmax"]) / len(reqs)
        for lam in lams:
            hp_l = hp.replace(mom2_update_weight=lam)
            drive(m, tok, adapter, reqs, prefixes, spec, hp_l, covs, Replay([values]), apply=True)
            post, _ = evaluate(m, tok, reqs)
            m.load_state_dict(base_state)  # undo the edit before the next λ
            shown = ("layers", "mom2_update_weight", "clamp_norm_factor", "v_num_grad_steps", "v_lr", "kl_factor", "v_weight_decay",
                     "kl_stop", "v_dtype")
            row = {"method": spec.name, **{k: v for k, v in hp_l.to_dict().items() if k in shown},
                   "n": n, "start": start, "values_s": round(t_values, 1), "threads": torch.get_num_threads(), "opt_argmax": opt_ok,
                   "mean_steps": sum(values.steps.tolist()) / len(reqs),
                   "pre": {k: round(pre[k], 4) for k in ("efficacy", "generalization", "specificity")},
                   "post": {k: round(post[k], 4) for k in ("efficacy", "generalization", "specificity", "score")}}
            print(json.dumps(row), flush=True)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app()
