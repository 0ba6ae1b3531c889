"""Issue 18 §6: settings of the constrained rules on one batch, targets optimised once.

The target values of a batch do not depend on the update rule, so they are optimised once (for the
first batch of a stream, on the unedited model) and every grid point only spreads them
(``Replay``; with ``norm_anchor`` after rescaling them to the unedited model's value norms, which
is what NAS does to optimised targets) and evaluates: efficacy / generalisation / specificity of the batch, ME-PPL-50, and the
growth of the edited matrices.  This picks the scale of the null-space rule's α and its share of
eigenvectors before the (slow) streams; the streams then check the choice over a history.

Records default to CounterFact dev 10000-10099, disjoint from the reported streams (0-9999).

    python benchmarks/tune_constraints.py --method pmet --overrides '{"v_dtype": "float32", "cov_dtype": "float32"}'
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRID = [{"solver": "closed_form"}] + [
    {"solver": "null_space", "null_space_share": share, "null_space_alpha": alpha}
    for share in (0.25, 0.5, 0.75) for alpha in (0.1, 1.0, 10.0, 100.0)]


def main(method: str = "pmet", start: int = 10000, n: int = 100, hparams: str = "smollm2-135m-instruct",
         overrides: str = "{}", grid: str = "", out: Path = ROOT / "benchmarks" / "results" / "tune_constraints"):
    import torch

    from pipeline.data import me_ppl_texts, sample_records
    from pipeline.editing.context import context_prefixes
    from pipeline.corpus import Corpus
    from pipeline.editing.covariance import cut_of, second_moments, spectra
    from pipeline.editing.driver import Optimise, Replay, anchor_targets, drive
    from pipeline.editing.engine import default_corpus
    from pipeline.editing.hparams import load_hparams
    from pipeline.editing.methods import get_method, sites_of
    from pipeline.editing.spread import written_projections
    from pipeline.editing.targets import anchor_norms
    from pipeline.evaluation.perplexity import perplexity
    from pipeline.evaluation.protocols import evaluate
    from pipeline.models.adapters import adapter_for
    from pipeline.models.loading import cache_home, load_model
    from pipeline.models.weights import trial
    from pipeline.requests import parse_requests

    torch.manual_seed(0)
    lm = load_model()
    model, tok = lm.model, lm.tokenizer
    adapter = adapter_for(model)
    spec = get_method(method)
    base_hp = load_hparams(hparams, spec.hparams_from, json.loads(overrides))
    points = json.loads(grid) if grid else GRID
    reqs = parse_requests(copy.deepcopy(sample_records("counterfact", start, n)))
    texts = me_ppl_texts()
    targets = written_projections(spec.resolve(base_hp))
    cache = cache_home() / "covariance"
    covs, ids = second_moments(model, tok, adapter, lm.fingerprint, Corpus.from_file(default_corpus()), targets,
                               cut_of(base_hp), base_hp.cov_batch_tokens, base_hp.cov_dtype, cache, progress=True)
    spec_ = spectra(covs, ids, cache)
    prefixes = context_prefixes(model, tok, base_hp)
    t0 = time.perf_counter()
    values = drive(model, tok, adapter, reqs, prefixes, spec, base_hp, {}, Optimise(), apply=False,
                   spread_last=False).values
    values_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{method}_s{start}_n{n}.jsonl"
    params = dict(model.named_parameters())
    names = [adapter.parameter_name(role, layer) for role, layer in targets]
    base_norms = {n: float(params[n].detach().double().norm()) for n in names}
    base_ppl = perplexity(model, tok, texts)
    print(json.dumps({"values_s": values_s, "base_ppl": base_ppl}), flush=True)
    anchors = anchor_norms(model, tok, adapter, reqs, sites_of(spec.resolve(base_hp)))  # the model is unedited here
    for point in points:
        hp = base_hp.replace(**point)
        targets_used = [anchor_targets(v, anchors, hp.norm_anchor_skip) for v in values] if hp.norm_anchor else values
        with trial(model, names):  # back to the unedited model, bit for bit, after each point
            t0 = time.perf_counter()
            run = drive(model, tok, adapter, reqs, prefixes, spec, hp, covs, Replay(targets_used), apply=True,
                        spectra=spec_)
            spread_s = time.perf_counter() - t0
            post, _ = evaluate(model, tok, reqs)
            ratio = {n: float(params[n].detach().double().norm() / base_norms[n]) for n in run.deltas}
            row = {"method": method, **point, "start": start, "n": n, "spread_s": round(spread_s, 2),
                   **{k: round(post[k], 4) for k in ("efficacy", "generalization", "specificity", "score")},
                   "me_ppl_50": perplexity(model, tok, texts), "base_ppl": base_ppl,
                   "max_norm_ratio": max(ratio.values()), "update_norm": sum(r["update_norm"] for r in run.layers)}
        print(json.dumps(row), flush=True)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    typer.run(main)
