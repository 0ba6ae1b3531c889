"""How the sharded covariance and evaluation scale with processes (issue 19), and what that means for
a real corpus on GPUs.

Measured on this machine, each configuration a fresh ``torchrun --nproc-per-node R`` (R = 1, 2; one
torch thread per process, so R processes use R cores), alternating 1, 2, 1, 2, … so that the
machine's load hits both alike:

* ``covariance``: the key covariance pass (:func:`~pipeline.editing.covariance.sharded_second_moments`)
  of the default model over the first ``--tokens`` tokens of the WikiText sample, the bundled PMET
  layers and ``cov_dtype``; tokens/s = tokens / wall time of the pass (model loading and the
  counting pass excluded, every rank started together);
* ``evaluation``: :func:`~pipeline.evaluation.suite.evaluate_state` of the unedited default model
  on CounterFact dev records 0..``--records``-1 (teacher-forced prompts and sampled generations,
  settings of params.yaml, evaluation cache off); prompts/s = (scored prompts + generations) / wall time.

The machine is shared (load average recorded before and after every run): the figures are what
this machine gave then, not its capacity.  From the measured covariance cost per token the script
derives an estimate for the MEMIT/PMET corpus (100k Wikipedia articles) on GPT-J-6B with 1 and 8
GPUs; the assumptions are constants below and in the output, the arithmetic is in
benchmarks/RESULTS.md §6.

    python benchmarks/scaling.py --tokens 40000 --records 30 --repeat 2   # → results/scaling.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)

# --- the estimate's assumptions (stated in the output) ------------------------------------------
GPTJ = {"hidden": 4096, "inner": 16384, "layers_run": 9, "cov_layers": 6, "seq": 2048}  # MEMIT's GPT-J layers 3-8
ARTICLES = 100_000
TOKENS_PER_ARTICLE = 700  # mean tokens of an English Wikipedia article cut at 2,048 GPT-J tokens (assumed)
GPU_FLOPS = 125e12  # sustained bf16 FLOP/s of one A100-80GB-class GPU on these GEMMs (40% of its 312 TFLOP/s peak; assumed)


def pass_flops(hidden: int, attn_params: int, mlp_params: int, layers_run: int, cov_layers: int, d_in: int,
               seq: int) -> dict:
    """FLOPs per token of one covariance pass: the blocks run (2 per weight, plus the attention
    scores over a mean context of seq/2) and the per-layer products k kᵀ (2·d_in² each)."""
    blocks = layers_run * (2 * (attn_params + mlp_params) + 2 * 2 * (seq // 2) * hidden)
    return {"blocks": blocks, "products": cov_layers * 2 * d_in * d_in, "total": blocks + cov_layers * 2 * d_in * d_in}


def gptj_flops() -> dict:
    d, inner = GPTJ["hidden"], GPTJ["inner"]
    return pass_flops(d, 4 * d * d, 2 * d * inner, GPTJ["layers_run"], GPTJ["cov_layers"], inner, GPTJ["seq"])


def model_flops(model, hp) -> dict:
    """The same count for the measured model (a gated Llama-style MLP: three projections)."""
    c = model.config
    head = c.hidden_size // c.num_attention_heads
    attn = 2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * c.num_key_value_heads * head
    return pass_flops(c.hidden_size, attn, 3 * c.hidden_size * c.intermediate_size, max(hp.layers) + 1,
                      len(hp.layers), c.intermediate_size, hp.cov_max_length)


# --- the workers (one per rank, under torchrun) ---------------------------------------------------
def _sync() -> None:
    from pipeline import distributed

    distributed.broadcast(None, "synchronising the ranks")


def covariance_worker(tokens: int) -> dict:
    from pipeline.corpus import Corpus, Cut, summarise, text_blocks, tokenise
    from pipeline.editing.covariance import sharded_second_moments
    from pipeline.editing.engine import default_corpus
    from pipeline.editing.hparams import load_hparams
    from pipeline.editing.precision import working_copy
    from pipeline.models.adapters import adapter_for
    from pipeline.models.loading import load_model

    lm = load_model()
    hp = load_hparams("smollm2-135m-instruct", "pmet")
    corpus, cut = Corpus.open(default_corpus()), Cut(hp.cov_max_length, 0, tokens)
    summary = summarise(corpus, lm.tokenizer, cut)
    work = working_copy(lm.model, hp.cov_dtype)
    targets = [("mlp_out", layer) for layer in hp.layers]
    _, seconds = timed(lambda: sharded_second_moments(work, lm.tokenizer, adapter_for(work), corpus, cut, summary,
                                                      targets, hp.cov_batch_tokens, progress=False))
    # what a rank does with a text besides forwarding it: read it (every rank, every text) and
    # tokenise it (its share), each timed over the whole sample in this process
    n, tokenising_s = timed(lambda: sum(len(tokenise(lm.tokenizer, b)) for b in text_blocks(corpus)))
    _, reading_s = timed(lambda: sum(1 for _ in text_blocks(corpus)))
    return {"tokens": summary.n_tokens, "seconds": seconds, "tokens_per_s": summary.n_tokens / seconds,
            "cov_dtype": hp.cov_dtype, "layers": list(hp.layers), "tokenise_tokens_per_s": n / tokenising_s,
            "read_tokens_per_s": n / reading_s, "flops_per_token": model_flops(lm.model, hp)}


def timed(fn):
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def evaluation_worker(records: int) -> dict:
    import copy

    from pipeline.config import load_params
    from pipeline.data import sample_records
    from pipeline.editing.engine import default_corpus
    from pipeline.evaluation.suite import EvalSettings, evaluate_state, wikitext_tfidf
    from pipeline.models.loading import load_model
    from pipeline.requests import parse_requests

    lm = load_model()
    settings = EvalSettings.from_params(load_params(ROOT / "params.yaml")["evaluation"])
    reqs = parse_requests(copy.deepcopy(sample_records("counterfact", 0, records)))
    tfidf = wikitext_tfidf(default_corpus())
    (metrics, df), seconds = timed(lambda: evaluate_state(lm.model, lm.tokenizer, reqs, settings.generation, tfidf))
    generations = int((df["kind"] == "generation").sum())
    return {"records": records, "scored_prompts": len(df) - generations, "generations": generations,
            "seconds": seconds, "prompts_per_s": len(df) / seconds, "metrics": metrics}


# --- the driver -------------------------------------------------------------------------------------
def run_once(part: str, ranks: int, size: int, index: Path) -> dict:
    """One configuration in a fresh torchrun; rank 0's result with the load around it."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDITLEDGER_EVAL_CACHE": "off", "EDITLEDGER_CORPUS_INDEX": str(index),
           "OMP_WAIT_POLICY": "PASSIVE"}
    before = os.getloadavg()
    done = subprocess.run([str(torchrun), "--standalone", f"--nproc-per-node={ranks}", __file__, "--worker", part,
                           "--size", str(size)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: {part} with {ranks} ranks failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ranks": ranks, **result, "load_average_before": before, "load_average_after": os.getloadavg()}


def estimate(cov: dict) -> dict:
    """GPT-J-6B over 100k Wikipedia articles: wall time with 1 and 8 GPUs (see the module docstring)."""
    measured = cov["1"]["runs"][0]
    achieved = measured["flops_per_token"]["total"] * statistics.median(r["tokens_per_s"] for r in cov["1"]["runs"])
    fl = gptj_flops()
    tokens = ARTICLES * TOKENS_PER_ARTICLE
    gpu_rate = GPU_FLOPS / fl["total"]  # tokens/s of one GPU
    tokenise_rate = statistics.median(r["tokenise_tokens_per_s"] for r in cov["1"]["runs"])
    read_rate = statistics.median(r["read_tokens_per_s"] for r in cov["1"]["runs"])
    efficiency = cov["speedup_2_over_1"] / 2
    out = {"assumptions": {"articles": ARTICLES, "tokens_per_article": TOKENS_PER_ARTICLE, "gptj": GPTJ,
                           "gpu_sustained_flops": GPU_FLOPS,
                           "sharding": "the forward and the tokenisation (counting pass, then the pass) are split "
                                       "evenly over the GPUs' processes, tokenising at the rate measured here for one "
                                       "process; every process reads every text twice; the all-reduce of 6 × 16384² "
                                       "float64 (13 GB) is neglected; nothing overlaps (the pass synchronises the "
                                       "device every batch)"},
           "measured_here": {"flops_per_token_smollm2": measured["flops_per_token"], "cpu_flops_achieved": achieved,
                             "tokenise_tokens_per_s": tokenise_rate, "read_tokens_per_s": read_rate,
                             "two_rank_efficiency": efficiency},
           "gptj_flops_per_token": fl, "tokens": tokens, "gpu_tokens_per_s": gpu_rate,
           "cpu_core_hours_at_measured_rate": tokens * fl["total"] / achieved / 3600}
    for gpus in (1, 8):
        parts = {"forward_hours": tokens / (gpu_rate * gpus) / 3600,
                 "tokenise_hours": 2 * tokens / (tokenise_rate * gpus) / 3600,
                 "read_hours": 2 * tokens / read_rate / 3600}
        out[f"gpus_{gpus}"] = {**parts, "total_hours": sum(parts.values())}
    return out


@app.command()
def main(tokens: int = typer.Option(40_000, help="covariance tokens per run"),
         records: int = typer.Option(30, help="CounterFact records per evaluation run"),
         repeat: int = typer.Option(2, help="runs per configuration (alternating)"),
         worker: str = typer.Option(None, hidden=True), size: int = typer.Option(0, hidden=True),
         out: Path = typer.Option(ROOT / "benchmarks" / "results" / "scaling.json")):
    if worker:
        from pipeline import distributed

        distributed.init("cpu")
        result = covariance_worker(size) if worker == "covariance" else evaluation_worker(size)
        if distributed.is_main():
            print(json.dumps({**result, "world_size": distributed.size()}))
        return
    result: dict = {"cpu_count": os.cpu_count(), "threads_per_rank": 1, "repeat": repeat,
                    "note": "each run records the load average before and after it: above the core count, "
                            "other jobs shared the machine and the figures are what it gave then"}
    with tempfile.TemporaryDirectory() as index:
        for part, n in (("covariance", tokens), ("evaluation", records)):
            runs: dict[str, list] = {"1": [], "2": []}
            for r in range(repeat):
                for ranks in (1, 2):
                    runs[str(ranks)].append(run_once(part, ranks, n, Path(index)))
                    print(part, ranks, runs[str(ranks)][-1]["seconds"], flush=True)
            key = "tokens_per_s" if part == "covariance" else "prompts_per_s"
            med = {k: statistics.median(x[key] for x in v) for k, v in runs.items()}
            result[part] = {k: {"runs": v, f"median_{key}": med[k]} for k, v in runs.items()}
            result[part]["speedup_2_over_1"] = med["2"] / med["1"]
    result["estimate_gptj_100k_articles"] = estimate(result["covariance"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({p: result[p]["speedup_2_over_1"] for p in ("covariance", "evaluation")}))
    print(f"wrote {out}")


if __name__ == "__main__":
    app()
