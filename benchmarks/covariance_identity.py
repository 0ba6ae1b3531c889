"""Does this code compute the default key covariance as the earlier code did (issue 19)?

The default model (SmolLM2-135M-Instruct), the bundled WikiText sample and the bundled PMET cut,
computed by this code's streaming reader and sharded pass (one process) into a scratch cache, and
compared with the entries the earlier whole-file reader left in the user's covariance cache: the
same cache id (key) and the same bits for every layer.

    python benchmarks/covariance_identity.py --dtype float32   # → results/covariance_identity_float32.json
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import typer

from pipeline.corpus import Corpus, summarise
from pipeline.editing.covariance import cache_keys, cut_of, entry_path, load_entry, second_moments
from pipeline.editing.engine import default_corpus
from pipeline.editing.hparams import load_hparams
from pipeline.models.adapters import adapter_for
from pipeline.models.loading import cache_home, load_model

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)


@app.command()
def main(dtype: str = typer.Option("float32", help="cov_dtype: float32 | bfloat16"), threads: int = 1,
         out: Path = typer.Option(None, help="default: benchmarks/results/covariance_identity_<dtype>.json")):
    torch.set_num_threads(threads)
    lm = load_model()
    hp = load_hparams("smollm2-135m-instruct", "pmet")
    corpus, cut = Corpus.open(default_corpus()), cut_of(hp)
    targets = [("mlp_out", layer) for layer in hp.layers]
    keys = cache_keys(lm.fingerprint, corpus, cut, summarise(corpus, lm.tokenizer, cut), targets, dtype)
    earlier = cache_home() / "covariance"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        new, ids = second_moments(lm.model, lm.tokenizer, adapter_for(lm.model), lm.fingerprint, corpus, targets, cut,
                                  hp.cov_batch_tokens, dtype, Path(tmp), progress=False)
        seconds = time.perf_counter() - t0
    layers = {}
    for t in targets:
        path = entry_path(earlier, t, ids[t])
        old = load_entry(path, keys[t]) if path.exists() else None
        layers[f"{t[0]}@{t[1]}"] = {"id": ids[t], "earlier_entry_found": old is not None,
                                    "bit_identical": old is not None and bool(torch.equal(old, new[t])),
                                    "max_abs_diff": None if old is None else float((old - new[t]).abs().max())}
    result = {"dtype": dtype, "model_fingerprint": lm.fingerprint, "corpus_sha256": corpus.sha256,
              "key_example": keys[targets[0]], "seconds": seconds, "threads": threads, "layers": layers}
    out = out or ROOT / "benchmarks" / "results" / f"covariance_identity_{dtype}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(layers, indent=1))


if __name__ == "__main__":
    app()
