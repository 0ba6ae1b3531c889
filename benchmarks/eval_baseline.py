"""The unedited model's row of the evaluation suite, and what evaluating one batch costs (issue 4).

On the default model (SmolLM2-135M-Instruct) unless --model: CounterFact dev records 0–499
(efficacy, generalisation, specificity as success / magnitude / accuracy, score, fluency,
consistency), zsRE dev records 0–499 (token accuracy of question, rephrase, NQ question),
ME-PPL-50 perplexity, all with the evaluation settings of params.yaml; then the time of each part
of the evaluate stage for one batch of --timing-batch CounterFact requests.  One command:

    OMP_WAIT_POLICY=PASSIVE python benchmarks/eval_baseline.py     # → benchmarks/results/eval_baseline.json

Records the shared data refuses as edit requests (e.g. a zsRE record whose new answer is the old
one) are skipped and counted.  Threads: 1 for the 500-record part, 2 for the timing (defaults).  On
a shared 2-core machine 2 threads made the 500-record part many times slower (OpenMP threads
spinning while they wait for each other and other jobs hold the cores; ``OMP_WAIT_POLICY=PASSIVE``
makes them sleep instead); the metrics do not depend on the thread count.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
import transformers
import typer

from pipeline.config import load_params
from pipeline.data import me_ppl_texts, sample_records, verified_path
from pipeline.requests import RequestError, parse_record
from pipeline.evaluation.perplexity import perplexity
from pipeline.evaluation.suite import EvalSettings, evaluate_state, wikitext_tfidf
from pipeline.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


def requests_of(dataset: str, n: int) -> tuple[list, int]:
    reqs, skipped = [], 0
    for i, rec in enumerate(sample_records(dataset, 0, n)):
        try:
            reqs.append(parse_record(rec, i))
        except RequestError:
            skipped += 1
    return reqs, skipped


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", flush=True)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


@app.command()
def main(model: str = typer.Option(None, help="HF model directory (default: SmolLM2-135M-Instruct)"),
         n_counterfact: int = 500, n_zsre: int = 500, timing_batch: int = 100,
         threads: int = typer.Option(1, help="torch threads for the 500-record part (the metrics)"),
         timing_threads: int = typer.Option(2, help="torch threads for the timing of one batch"),
         params: Path = ROOT / "params.yaml", out: Path = ROOT / "benchmarks/results/eval_baseline.json"):
    torch.set_num_threads(threads)
    cfg = load_params(params)
    settings = EvalSettings.from_params(cfg["evaluation"])
    lm = load_model(model or cfg["model"]["path"], device=cfg["model"]["device"], dtype=cfg["model"]["dtype"])
    m, tok = lm.model, lm.tokenizer
    tfidf, fit_s = timed(wikitext_tfidf, verified_path("wikitext"))
    texts = me_ppl_texts()
    cf, cf_skipped = requests_of("counterfact", n_counterfact)
    zs, zs_skipped = requests_of("zsre", n_zsre)

    (cf_metrics, _), cf_s = timed(evaluate_state, m, tok, cf, settings.generation, tfidf)
    print(f"counterfact: {cf_metrics} ({cf_s:.0f}s)", flush=True)
    (zs_metrics, _), zs_s = timed(evaluate_state, m, tok, zs, settings.generation, None)
    print(f"zsre: {zs_metrics} ({zs_s:.0f}s)", flush=True)
    ppl, ppl_s = timed(perplexity, m, tok, texts, settings.ppl_max_length)
    print(f"ME-PPL-50: {ppl:.3f} ({ppl_s:.1f}s)", flush=True)

    result = {
        "model": {"path": str(lm.path), "fingerprint": lm.fingerprint, "device": cfg["model"]["device"],
                  "dtype": cfg["model"]["dtype"]},
        "machine": {"torch_threads": threads, "timing_torch_threads": timing_threads, "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "note": "CPU shared with other jobs while measuring: timings are upper bounds"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {"generation": settings.generation.describe(), "perplexity_max_length": settings.ppl_max_length,
                     "retention": vars(settings.retention)},
        "counterfact": {"records": f"0-{n_counterfact - 1}", "n_evaluated": len(cf), "n_skipped": cf_skipped,
                        "metrics": cf_metrics, "seconds": cf_s},
        "zsre": {"records": f"0-{n_zsre - 1}", "n_evaluated": len(zs), "n_skipped": zs_skipped,
                 "metrics": zs_metrics, "seconds": zs_s},
        "me_ppl_50": {"perplexity": ppl, "n_texts": len(texts), "seconds": ppl_s},
    }
    write(out, result)  # the metrics are kept even if the timing part is interrupted

    batch = cf[:timing_batch]
    torch.set_num_threads(timing_threads)
    _, scoring_s = timed(evaluate_state, m, tok, batch, settings.generation, None)
    _, full_s = timed(evaluate_state, m, tok, batch, settings.generation, tfidf)
    # the evaluate stage of a batch that has a parent and a full retention sample evaluates:
    # base and post with generation, pre without, the retained requests with generation, ME-PPL twice
    n_ret = min(settings.retention.sample or timing_batch, timing_batch)
    stage_s = scoring_s + (2 + n_ret / timing_batch) * full_s + 2 * ppl_s + fit_s
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["timing_one_batch"] = {
        "batch_size": len(batch), "protocol_only_s": scoring_s, "protocol_and_generation_s": full_s,
        "me_ppl_50_s": ppl_s, "tfidf_fit_s": fit_s, "retained_requests": n_ret,
        "evaluate_stage_estimate_s": stage_s,
        "estimate": "protocol_only (pre) + (2 + retained/batch) × protocol_and_generation (base, post, "
                    "retention) + 2 × ME-PPL + TF-IDF fit; each term measured above"}
    write(out, result)


if __name__ == "__main__":
    app()
