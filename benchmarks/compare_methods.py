"""The method comparison table: PMET, MEMIT, JEEP, PMET + iterative, PMET + NA and PMET's ablations
on the same CounterFact dev requests, edited in sequential batches (lifelong), on SmolLM2-135M.

For every variant the base model is edited batch after batch (batch b is computed on the model
that already holds batches 1..b-1; the covariance is the base model's, as in the ledger), then the
final model is evaluated on *all* requests (retention): efficacy, generalisation, specificity
(success rates; neighbours used by NA are left out of their request's specificity), score,
fluency (n-gram entropy of generations from ``generation_prompts``), ME-PPL-50 perplexity, and
the mean number of iterations per batch.  One row is the unedited model.

    python benchmarks/compare_methods.py                       # the full table (hours on 2 CPU cores)
    python benchmarks/compare_methods.py --n 5 --batch 5 --variants pmet,pmet+iterative   # a smoke run
    python benchmarks/compare_methods.py --dry-run             # check the variants, print the plan
    OMP_NUM_THREADS=1 python benchmarks/compare_methods.py --variants memit,jeep &   # split over processes
    python benchmarks/compare_methods.py --table-only          # assemble the table from the row files

Each variant's row is written to its own file under ``results/compare_methods_n300_b100/`` as
soon as it is done; a rerun skips variants whose row exists (``--force`` recomputes them).

A variant is ``METHOD[+iterative][+na|+nap]``.  Runs with fewer than 300 requests are written with
``smoke`` in the file name and a SMOKE RUN banner: they show that the script works, not results.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_VARIANTS = ("pmet", "memit", "jeep", "pmet+iterative", "pmet+na", "pmet-mlp-only", "pmet-attn-write",
                    "pmet-even")
FULL_N = 300
DEFAULT_START = 0  # CounterFact dev records 0..299 (the hyper-parameter sweeps used 1000-1099)


def parse_variant(text: str, neighbors: int) -> tuple[str, dict]:
    """``'pmet+iterative+na'`` → (method, hyper-parameter overrides); unknown parts fail here."""
    from pipeline.editing.methods import get_method

    method, *mods = text.split("+")
    get_method(method)
    overrides: dict = {}
    for m in mods:
        if m == "iterative":
            overrides["iterative"] = True
        elif m in ("na", "nap"):
            overrides["neighbors"] = neighbors
            overrides["neighbor_prefixes"] = m == "nap"
        else:
            raise SystemExit(f"error: unknown modifier {m!r} in variant {text!r} (iterative, na, nap)")
    return method, overrides


def evaluate_state(model, tok, reqs, editing_neighbors, texts: list[str], tfidf, fingerprint: str | None = None) -> dict:
    """The headline row of one model state: the evaluate stage's suite (CounterFact protocol, and
    with ``tfidf`` the generation metrics, default decoding settings) plus ME-PPL-50 perplexity.
    With the state's ``fingerprint`` (the unedited model's) results come from and go to the
    evaluation cache, so every benchmark's unedited row is computed once per record."""
    from pipeline.evaluation.cache import StateCache
    from pipeline.evaluation.generation import DecodingSettings
    from pipeline.evaluation.perplexity import perplexity
    from pipeline.evaluation.suite import evaluate_state as suite_state

    cache = StateCache.of(model, fingerprint)
    m, _ = suite_state(model, tok, reqs, DecodingSettings(), tfidf, editing_neighbors, cache)
    row = {k: m.get(k) for k in ("efficacy", "generalization", "specificity", "score", "fluency")}
    row["me_ppl_50"] = perplexity(model, tok, texts, cache=cache)
    return row


def generation_tfidf(skip: bool):
    """The IDF the suite's generation metrics need (WikiText sample), or None to skip them."""
    if skip:
        return None
    from pipeline.editing.engine import default_corpus
    from pipeline.evaluation.suite import wikitext_tfidf

    return wikitext_tfidf(default_corpus())


def run_tag(args) -> str:
    tag = f"compare_methods{'_smoke' if args.n < FULL_N else ''}_n{args.n}_b{args.batch}"
    if args.overrides:
        tag += "_" + "_".join(f"{k}{v}" for k, v in sorted(args.overrides.items()))
    return tag


def row_file(rows_dir: Path, variant: str) -> Path:
    return rows_dir / f"{variant.replace('+', '_plus_')}.json"


def write_table(args, tag: str, rows_dir: Path, variants: list[str]) -> Path:
    """Assemble the table from the per-variant row files present (a missing variant is listed as such)."""
    smoke = args.n < FULL_N
    rows, missing = [], []
    for v in ["unedited", *variants]:
        f = row_file(rows_dir, v)
        if f.exists():
            rows.append(json.loads(f.read_text()))
        else:
            missing.append(v)
    meta = {"smoke_run": smoke, "model": "SmolLM2-135M-Instruct", "records": [args.start, args.start + args.n - 1],
            "batch": args.batch, "hparams": args.hparams, "overrides": args.overrides, "neighbors": args.neighbors,
            "fluency": "not computed (--skip-fluency)" if args.skip_fluency else "n-gram entropy of generations",
            "missing_variants": missing}
    (args.out / f"{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = ["variant", "efficacy", "generalization", "specificity", "score", "fluency", "me_ppl_50", "avg_iterations",
            "edit_s", "threads"]
    fmt = lambda x: "—" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = [f"# {'SMOKE RUN — not a result: ' if smoke else ''}method comparison, SmolLM2-135M, CounterFact dev "
             f"{args.start}–{args.start + args.n - 1}, sequential batches of {args.batch}", "",
             f"fluency: {meta['fluency']}; hyper-parameter overrides for every variant: {args.overrides or 'none'}",
             *(["", f"**not run yet:** {', '.join(missing)}"] if missing else []),
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    shown = lambda r, c: None if c == "avg_iterations" and "+iterative" not in r["variant"] else r.get(c)  # noqa: E731
    lines += ["| " + " | ".join(fmt(shown(r, c)) for c in cols) + " |" for r in rows]
    md = args.out / f"{tag}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def claim(rows_dir: Path, variant: str, force: bool) -> bool:
    """Take ``variant`` for this process: False if its row exists (unless ``force``) or a live
    process holds its claim file, so that several processes can work through one list."""
    if row_file(rows_dir, variant).exists() and not force:
        return False
    lock = row_file(rows_dir, variant).with_suffix(".claim")
    try:
        holder = int(lock.read_text() or 0)
        os.kill(holder, 0)
        if holder != os.getpid():
            return False
    except (FileNotFoundError, ValueError, ProcessLookupError):
        pass  # free, or its holder died
    lock.write_text(str(os.getpid()))
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--n", type=int, default=FULL_N, help="requests in all (≥ 300 for the real table)")
    ap.add_argument("--batch", type=int, default=100, help="requests per sequential batch")
    ap.add_argument("--start", type=int, default=DEFAULT_START)
    ap.add_argument("--neighbors", type=int, default=1, help="neighbours per request for +na / +nap (paper: 1)")
    ap.add_argument("--hparams", default="smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--overrides", type=json.loads, default={},
                    help="JSON hyper-parameter overrides for every variant (e.g. a smaller cov_max_texts for a smoke run)")
    ap.add_argument("--skip-fluency", action="store_true",
                    help="leave fluency out (column 'not computed')")
    ap.add_argument("--force", action="store_true", help="recompute variants whose row file already exists")
    ap.add_argument("--table-only", action="store_true", help="only assemble the table from the row files present")
    ap.add_argument("--dry-run", action="store_true", help="validate the variants and print the plan only")
    args = ap.parse_args(argv)

    from pipeline.editing.hparams import load_hparams
    from pipeline.editing.methods import get_method

    if args.n < 1 or args.batch < 1 or args.n % args.batch:
        raise SystemExit(f"error: --n ({args.n}) must be a positive multiple of --batch ({args.batch})")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    plan = []
    for v in variants:
        method, over = parse_variant(v, args.neighbors)
        over = {**args.overrides, **over}
        hp = load_hparams(args.hparams, get_method(method).hparams_from, over)  # bad settings fail before work
        plan.append((v, method, hp))
    tag = run_tag(args)
    rows_dir = args.out / tag
    smoke = args.n < FULL_N
    batches = [(args.start + b, args.start + b + args.batch) for b in range(0, args.n, args.batch)]
    print(f"{'SMOKE RUN: ' if smoke else ''}{len(plan)} variants × records {args.start}..{args.start + args.n - 1} "
          f"in {len(batches)} sequential batch(es) of {args.batch}; rows in {rows_dir}")
    todo = [(v, m, hp) for v, m, hp in plan if args.force or not row_file(rows_dir, v).exists()]
    for v, method, hp in plan:
        state = "to run" if (v, method, hp) in todo else "done (row file present)"
        print(f"  {v}: method {method}, layers {list(hp.layers)}"
              f"{f', high {list(hp.high_layers)}' if hp.high_layers else ''}, modifiers {hp.modifiers or 'none'}: {state}")
    if args.dry_run:
        return 0
    rows_dir.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        print(f"wrote {write_table(args, tag, rows_dir, variants)}")
        return 0

    import torch

    from pipeline.data import me_ppl_texts, sample_records
    from pipeline.editing.engine import edit
    from pipeline.requests import parse_requests
    from pipeline.models.loading import load_model

    tfidf = generation_tfidf(args.skip_fluency)
    torch.manual_seed(0)
    lm = load_model()
    base_state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    records = sample_records("counterfact", args.start, args.n)
    all_reqs = parse_requests(copy.deepcopy(records))
    texts = me_ppl_texts()
    threads = torch.get_num_threads()

    def save(row: dict) -> None:
        """One file per variant, written atomically: runs can be resumed, split over processes."""
        f = row_file(rows_dir, row["variant"])
        tmp = f.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=2))
        tmp.replace(f)
        f.with_suffix(".claim").unlink(missing_ok=True)
        print(json.dumps({k: v for k, v in row.items() if k != "iterations"}), flush=True)

    if args.force or not row_file(rows_dir, "unedited").exists():
        save({"variant": "unedited", **evaluate_state(lm.model, lm.tokenizer, all_reqs, None, texts, tfidf, lm.fingerprint),
              "avg_iterations": None, "edit_s": 0.0, "threads": threads})
    for v, method, hp in todo:
        if not claim(rows_dir, v, args.force):
            print(f"  {v}: done or running in another process, skipped", flush=True)
            continue
        lm.model.load_state_dict(base_state)
        neighbors, iters, trace, t0 = [], [], [], time.perf_counter()
        for lo, hi in batches:
            reqs = all_reqs[lo - args.start : hi - args.start]
            res = edit(lm.model, lm.tokenizer, reqs, method=method, hparams=hp, apply=True,
                       fingerprint=lm.fingerprint, progress=False)
            iters.append(len(res.iterations) if res.iterations else 1)
            trace.append(res.iterations)  # per batch: p(θ_k, h̄_k), p(θ_k+1, ĥ_k), |Δp_k| of every iteration
            neighbors += res.editing_neighbors or [[] for _ in reqs]
            print(f"  {v}: batch {lo}-{hi - 1} edited at {time.perf_counter() - t0:.0f} s", flush=True)
        edit_s = time.perf_counter() - t0
        save({"variant": v, **evaluate_state(lm.model, lm.tokenizer, all_reqs, neighbors if hp.neighbors else None,
                                             texts, tfidf),
              "avg_iterations": sum(iters) / len(iters), "edit_s": edit_s, "threads": threads, "iterations": trace,
              "neighbors_used": sum(len(x) for x in neighbors) if hp.neighbors else None})
    lm.model.load_state_dict(base_state)
    print(f"wrote {write_table(args, tag, rows_dir, variants)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
