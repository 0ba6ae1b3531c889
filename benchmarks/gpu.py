"""The GPU path measured (issue 19): one prepared script for a machine with a GPU.

Three parts, one JSON (``--out``, default ``benchmarks/results/gpu_<device>.json``):

1. ``engines``: seconds per edit for ``--n`` CounterFact dev requests (records 0..n-1) on
   SmolLM2-135M-Instruct, PMET with the bundled hyper-parameters (value optimisation in bfloat16,
   one process on the GPU), fast engine vs the per-request reference engine; the covariance is
   computed by the first call (its time is reported apart) and read from the cache after;
2. ``covariance``: tokens/s of the key covariance pass on SmolLM2 over the WikiText sample, float32
   and bfloat16 compute (nothing cached);
3. ``big``: a Llama-3-8B-shaped model built from its published config (hidden 4096, MLP 14336,
   32 layers, 32 heads / 8 KV heads, vocabulary 128256) with random bfloat16 weights: covariance
   tokens/s over ``--big-tokens`` tokens, then seconds per edit and peak GPU memory for one batch of
   ``--n`` requests (PMET, layers 4-8; the edit computes its covariance again, reported apart, and
   the peak includes its float64 accumulators).  Random weights measure cost, not quality; prompts are
   tokenised with SmolLM2's tokenizer (Llama-3's is not available offline; its ids fit the larger
   vocabulary).

``--smoke`` runs the same code end to end on the CPU with tiny configurations (a 4-layer random
Llama for parts 1-2, a scaled-down Llama-3 shape for part 3, 3 requests, 2,000 covariance tokens):
what the test suite runs, so the script is known to work before a GPU is spent on it.

    python benchmarks/gpu.py                      # on the GPU machine (device cuda)
    python benchmarks/gpu.py --smoke --out /tmp/gpu_smoke.json

Not yet run on a GPU: no GPU was lent to the session that wrote it (benchmarks/RESULTS.md §6).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
import transformers
import typer

from pipeline.corpus import Corpus, Cut, summarise
from pipeline.data import sample_records
from pipeline.editing.covariance import sharded_second_moments
from pipeline.editing.engine import default_corpus, edit
from pipeline.editing.hparams import load_hparams
from pipeline.editing.precision import working_copy
from pipeline.models.adapters import adapter_for
from pipeline.models.loading import default_model_dir, load_model
from pipeline.requests import parse_requests

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)

# Meta-Llama-3-8B's config.json (the fields that set its cost)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
SMOKE_BIG = dict(LLAMA3_8B, hidden_size=128, intermediate_size=448, num_hidden_layers=10, num_attention_heads=4,
                 num_key_value_heads=1, vocab_size=49152)
SMOKE_SMALL = dict(SMOKE_BIG, hidden_size=64, intermediate_size=128, num_hidden_layers=4)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def random_llama(shape: dict, device: str, dtype: torch.dtype):
    """A Llama of ``shape`` with seeded random weights, built on ``device`` (no checkpoint)."""
    cfg = transformers.LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def edit_seconds(device: str, model, tok, reqs, hp, engine: str, cache: Path, fingerprint: str) -> dict:
    """One edit of the whole batch: seconds per request beyond the covariance (computed by the first call)."""
    res, total = timed(device, lambda: edit(model, tok, reqs, "pmet", hp, engine=engine, cache_dir=cache,
                                            fingerprint=fingerprint, progress=False))
    cov = res.timings["covariance_s"]
    return {"engine": engine, "n_requests": len(reqs), "total_s": total, "covariance_s": cov,
            "seconds_per_edit": (total - cov) / len(reqs), "timings": res.timings,
            "steps_mean": sum(res.steps) / len(res.steps)}


def covariance_rate(device: str, model, tok, hp, dtype: str, max_tokens: int) -> dict:
    """Tokens/s of one uncached covariance pass over the WikiText sample (``hp``'s layers)."""
    corpus, cut = Corpus.open(default_corpus()), Cut(hp.cov_max_length, 0, max_tokens)
    summary = summarise(corpus, tok, cut)
    work = working_copy(model, dtype)
    targets = [("mlp_out", layer) for layer in hp.layers]
    _, s = timed(device, lambda: sharded_second_moments(work, tok, adapter_for(work), corpus, cut, summary, targets,
                                                        hp.cov_batch_tokens, progress=False))
    return {"dtype": dtype, "tokens": summary.n_tokens, "seconds": s, "tokens_per_s": summary.n_tokens / s}


def peak_memory(device: str) -> dict:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.startswith("cuda"):
        out["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return out


@app.command()
def main(n: int = typer.Option(100, help="CounterFact requests per edit"),
         big_tokens: int = typer.Option(100_000, help="covariance tokens for the 8B-shaped model"),
         smoke: bool = typer.Option(False, "--smoke", help="tiny configurations on the CPU (the test)"),
         device: str = typer.Option(None, help="default: cuda, or cpu with --smoke"),
         out: Path = typer.Option(None, help="default: benchmarks/results/gpu_<device name>.json")):
    device = device or ("cpu" if smoke else "cuda")
    if smoke:
        n, big_tokens = min(n, 3), min(big_tokens, 2000)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    out = out or ROOT / "benchmarks" / "results" / f"gpu_{name.replace(' ', '_')}.json"
    reqs = parse_requests(copy.deepcopy(sample_records("counterfact", 0, n)))
    result: dict = {"device": device, "device_name": name, "smoke": smoke, "n_requests": n,
                    "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                                 "transformers": transformers.__version__},
                    "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()}}
    hp = load_hparams("smollm2-135m-instruct", "pmet")
    with tempfile.TemporaryDirectory() as tmp:
        if smoke:
            tok = transformers.AutoTokenizer.from_pretrained(default_model_dir())
            small, fp = random_llama(SMOKE_SMALL, device, torch.float32), "smoke-small"
            hp_small = hp.replace(layers=[1, 2], cov_max_tokens=big_tokens, v_num_grad_steps=3)
        else:
            lm = load_model(device=device)
            tok, small, fp, hp_small = lm.tokenizer, lm.model, lm.fingerprint, hp
        result["engines"] = [edit_seconds(device, small, tok, reqs, hp_small, e, Path(tmp) / "small", fp)
                             for e in ("fast", "reference")]
        print(json.dumps(result["engines"], indent=1), flush=True)
        result["covariance"] = [covariance_rate(device, small, tok, hp_small, d, hp_small.cov_max_tokens)
                                for d in ("float32", "bfloat16")]
        print(json.dumps(result["covariance"], indent=1), flush=True)
        del small
        big = random_llama(SMOKE_BIG if smoke else LLAMA3_8B, device, torch.bfloat16)
        hp_big = hp.replace(layers=[4, 5, 6, 7, 8], cov_max_tokens=big_tokens, **({"v_num_grad_steps": 3} if smoke else {}))
        rate = covariance_rate(device, big, tok, hp_big, "bfloat16", big_tokens)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        run = edit_seconds(device, big, tok, reqs, hp_big, "fast", Path(tmp) / "big", "random-llama3-8b-shape-seed0")
        result["big"] = {"shape": SMOKE_BIG if smoke else LLAMA3_8B, "parameters": sum(p.numel() for p in big.parameters()),
                         "dtype": "bfloat16", "layers": list(hp_big.layers), "covariance": rate, "edit": run,
                         "memory_during_edit": peak_memory(device)}
        print(json.dumps(result["big"], indent=1), flush=True)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    app()
