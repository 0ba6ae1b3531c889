"""What evaluating one model state costs, before and after a change of the evaluation code (issue 21).

For ``--n`` CounterFact dev requests (records 0..n-1) on the default model, the three parts of a
state's evaluation, each timed on its own: the teacher-forced protocol (efficacy, generalisation,
specificity: every prompt scored for both objects), the generation metrics (fluency, consistency:
two sampled generations per record) and ME-PPL-50 perplexity.  Two versions of ``pipeline/`` are
measured in the same session, alternating (before, after, before, after, …) so that a change in the
machine's load hits both alike: ``--before`` names a git commit (checked out into a temporary
worktree), the working tree is *after*.  Each measurement is a fresh process with the evaluation
cache off (``EDITLEDGER_EVAL_CACHE=off``), so it measures computation; *after* is then measured once
more reading a warm cache (the ``base`` state of every later batch).  The metrics of both versions
are recorded side by side.

    python benchmarks/eval_speed.py --before e7dd5bb --n 100 --repeat 3   # → results/eval_speed_n100.json
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PARTS = ("protocol", "generation", "perplexity")


def measure(code: Path, n: int, threads: int) -> dict:
    """One process: the three parts on the unedited model with ``code``'s ``pipeline`` (the worker)."""
    sys.path.insert(0, str(code))
    import copy

    import torch

    torch.set_num_threads(threads)
    from pipeline.data import me_ppl_texts, sample_records
    from pipeline.editing.engine import default_corpus
    from pipeline.evaluation.generation import DecodingSettings
    from pipeline.evaluation.perplexity import perplexity
    from pipeline.evaluation.protocols import evaluate
    from pipeline.evaluation.suite import generation_metrics, wikitext_tfidf
    from pipeline.models.loading import load_model
    from pipeline.requests import parse_requests

    import pipeline

    assert Path(pipeline.__file__).resolve().is_relative_to(code.resolve()), pipeline.__file__
    lm = load_model()
    reqs = parse_requests(copy.deepcopy(sample_records("counterfact", 0, n)))
    tfidf = wikitext_tfidf(default_corpus())
    texts = me_ppl_texts()
    kw = {}
    if os.environ.get("EDITLEDGER_EVAL_CACHE") != "off":  # only the code under test has a cache
        from pipeline.evaluation.cache import StateCache

        kw = {"cache": StateCache.of(lm.model, lm.fingerprint)}
    out: dict = {"seconds": {}, "metrics": {}}
    for part, run in (("protocol", lambda: evaluate(lm.model, lm.tokenizer, reqs, **kw)[0]),
                      ("generation", lambda: generation_metrics(lm.model, lm.tokenizer, reqs, DecodingSettings(),
                                                                tfidf, **kw)[0]),
                      ("perplexity", lambda: {"me_ppl_50": perplexity(lm.model, lm.tokenizer, texts, **kw)})):
        t0 = time.perf_counter()
        out["metrics"][part] = run()
        out["seconds"][part] = time.perf_counter() - t0
    return out


def worker(code: Path, n: int, threads: int, cache: str) -> dict:
    from pipeline.data import shared_dir  # both versions read this checkout's data mirror
    from pipeline.editing.engine import default_corpus

    env = {**os.environ, "EDITLEDGER_EVAL_CACHE": cache, "OMP_WAIT_POLICY": "PASSIVE",
           "EDITLEDGER_SHARED_DATA": str(shared_dir()), "EDITLEDGER_CORPUS": str(default_corpus())}
    cmd = [sys.executable, __file__, "--worker", str(code), "--n", str(n), "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: the measurement of {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(before: str, n: int = 100, threads: int = 2, repeat: int = 3, out: Path | None = None) -> Path:
    out = out or ROOT / "benchmarks" / "results" / f"eval_speed_n{n}.json"
    runs: dict[str, list[dict]] = {"before": [], "after": [], "after_cached": []}
    with tempfile.TemporaryDirectory() as tmp:
        wt = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(wt), before], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for r in range(repeat):
                runs["before"].append(worker(wt, n, threads, "off"))
                runs["after"].append(worker(ROOT, n, threads, "off"))
                print(f"repeat {r + 1}/{repeat}: before {runs['before'][-1]['seconds']}, after {runs['after'][-1]['seconds']}",
                      flush=True)
            cache = str(Path(tmp) / "cache.sqlite3")
            worker(ROOT, n, threads, cache)  # fills the cache
            runs["after_cached"].append(worker(ROOT, n, threads, cache))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, check=False)
    medians = {k: {p: statistics.median(x["seconds"][p] for x in v) for p in PARTS} for k, v in runs.items() if v}
    result = {"n_requests": n, "threads": threads, "repeat": repeat, "before": before,
              "after": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                      text=True).stdout.strip() + " + working tree",
              "median_seconds": medians,
              "seconds_per_request": {k: {p: s / n for p, s in v.items()} for k, v in medians.items()},
              "metrics": {k: v[0]["metrics"] for k, v in runs.items() if v},
              "load_average": os.getloadavg(), "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(medians, indent=1))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", help="git commit of the code to compare with")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(measure(a.worker, a.n, a.threads)))
    elif a.before:
        main(a.before, a.n, a.threads, a.repeat, a.out)
    else:
        ap.error("--before COMMIT is required")
