"""The lifelong benchmark (issues 6, 18): CounterFact dev edits in sequential batches on SmolLM2-135M,
one history per *variant* (a method and its settings: ``VARIANTS``) on the same requests, with

* after every batch: the batch's own edits (efficacy, generalisation, specificity), the norm of
  every edited matrix against the base (‖W‖/‖W₀‖, the growth that precedes collapse), and every
  ``--retention-every`` batches the *retention curve* — a seeded sample of the edits of all earlier
  batches, drawn as the evaluate stage draws it (:mod:`pipeline.evaluation.retention`),
  teacher-forced metrics only — and ME-PPL-50;
* after the last batch: every edit of the history (efficacy, generalisation, specificity, score),
  fluency (n-gram entropy) and ME-PPL-50 perplexity, the unedited model alongside, and the norm
  growth of every edited matrix.

Constrained variants get what their rule needs the way the ledger gives it: the null-space rule the
history ``Σ KᵀK`` of every earlier batch's keys (all stay active in a stream), norm anchoring the
unedited model's value norms (a copy of the base model).

It runs for hours on a 2-core CPU, so it is resumable: after each batch the edited weights and the
history are checkpointed (only the parameters that changed, under the editledger cache), the
batch's *targets* (the optimised values and context prefixes, 0.23 MB for MEMIT, 0.46 for PMET) written to
``targets/NNNN.safetensors`` beside the curve, to be committed with it, and the batch's row appended
to ``curve.jsonl``; a rerun continues after the last completed batch.  The weights are updated in
place batch after batch exactly as ``edit(..., apply=True)`` does, and the checkpoint holds those
tensors themselves, so a resumed history equals an uninterrupted one bit for bit.  In a new session
(no checkpoint) the history is rebuilt from the committed targets, batch by batch, as the ledger's
``apply`` stage does: no optimisation (a MEMIT batch of 100: 12 s on 2 idle cores, 37 s on one shared), bit-identical on the machine that
wrote them (the test in ``tests/test_constrained.py``) and checked against the curve's recorded
norms on any other.  Streams: 2000 = 20 × 100 and 10000 = 100 × 100 from record 0, 500 × 1 (``--batch 1``);
``--start`` ≥ 10000 is a tuning stream (records disjoint from the reported ones); anything else is
labelled a smoke run.  ``--overrides`` (JSON) applies to every variant, e.g. float32 compute on a
CPU without bfloat16 dot products.

    python benchmarks/lifelong.py --variants pmet+ns,memit+ns           # 20 × 100 on records 0-1999
    python benchmarks/lifelong.py --variants pmet+ns --n 300 --start 10000  # a tuning stream
    python benchmarks/lifelong.py --table-only --variants pmet,memit,pmet+ns
    python benchmarks/lifelong.py --growth-only                         # growth.json of finished histories
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FULL_N = 2000
STREAMS = {(2000, 100), (10000, 100), (500, 1)}  # the reported streams (from record 0)
TUNING_START = 10000  # records from here on tune settings; the reported streams use 0-9999
# variant → (method, hyper-parameter overrides on the bundled setting)
# the null-space rule as tuned on one batch of records 10000-10099 (benchmarks/tune_constraints.py,
# RESULTS.md §5): 75% of the eigenvectors, α = 10
NULL_SPACE = {"solver": "null_space", "null_space_share": 0.75, "null_space_alpha": 10.0}
VARIANTS: dict[str, tuple[str, dict]] = {
    "memit": ("memit", {}),
    "pmet": ("pmet", {}),
    "jeep": ("jeep", {}),
    "memit+ns": ("memit", NULL_SPACE),
    "pmet+ns": ("pmet", NULL_SPACE),
    "pmet-c0.75+ns": ("pmet", {**NULL_SPACE, "clamp_norm_factor": 0.75}),
    "jeep+ns": ("jeep", NULL_SPACE),
    # ENCORE (Gupta et al. 2025): most-probable early stopping + the norm term; NAS: norm anchors
    "memit+encore": ("memit", {"argmax_stop_steps": 2, "norm_weight": 10.0}),
    # the joint rule: every batch solved together with the keys of all earlier ones (= one batch of all)
    "memit+joint": ("memit", {"solver": "joint"}),
    # the joint rule with 5 and 10 times the covariance weight (chosen by benchmarks/replay_sweep.py)
    "memit+joint-5k": ("memit", {"solver": "joint", "mom2_update_weight": 5000}),
    "memit+joint-10k": ("memit", {"solver": "joint", "mom2_update_weight": 10000}),
    # the joint rule spread over 8 layers instead of 5: each layer writes less of the same targets
    "memit+joint-l1-8": ("memit", {"solver": "joint", "layers": [1, 2, 3, 4, 5, 6, 7, 8]}),
    "pmet+joint": ("pmet", {"solver": "joint"}),
    "memit+joint+mpes": ("memit", {"solver": "joint", "argmax_stop_steps": 2}),
    "pmet+nas": ("pmet", {"norm_anchor": True, "norm_anchor_skip": 3.0}),
    "pmet+ns+nas": ("pmet", {**NULL_SPACE, "norm_anchor": True, "norm_anchor_skip": 3.0}),
}
# = pipeline.stages.summary.HEADLINE, kept here so that importing the script (its table test) stays light
HEADLINE = ("efficacy", "generalization", "specificity", "score")


def pick(metrics: dict) -> dict:
    return {k: metrics[k] for k in HEADLINE}


def stream_label(n: int, batch: int, start: int) -> str:
    """``''`` for a reported stream, ``'tuning'`` on the tuning records, else ``'smoke'``."""
    if start >= TUNING_START:
        return "tuning"
    return "" if (n, batch) in STREAMS and start == 0 else "smoke"


def run_dir(out: Path, n: int, batch: int, start: int) -> Path:
    label = stream_label(n, batch, start)
    return out / f"lifelong{'_' + label if label else ''}_n{n}_b{batch}_s{start}"


def variant_hparams(name: str, hparams: str, overrides: dict):
    """The hyper-parameters of a variant: the bundled method section, the variant's changes, then
    the run's ``--overrides``."""
    from pipeline.editing.hparams import load_hparams
    from pipeline.editing.methods import get_method

    if name not in VARIANTS:
        raise typer.BadParameter(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    method, changes = VARIANTS[name]
    return method, load_hparams(hparams, get_method(method).hparams_from, {**changes, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_targets(path: Path, res) -> None:
    """A batch's targets, pass by pass (``p{k}/{site}``, ``p{k}/steps``), and its context prefixes:
    all :class:`~pipeline.editing.driver.Replay` needs to spread the batch again."""
    from safetensors.torch import save_file

    tensors = {f"p{k}/steps": v.steps.contiguous() for k, v in enumerate(res.values)}
    tensors |= {f"p{k}/{site}": z.detach().contiguous() for k, v in enumerate(res.values) for site, z in v.targets.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"prefixes": json.dumps(res.prefixes), "passes": str(len(res.values))})
    tmp.replace(path)


def save_checkpoint(path: Path, state: dict, changed: set[str], history: dict) -> None:
    """The parameters the history has written and its ``Σ KᵀK`` (``history/…``), atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({**{k: state[k].detach().contiguous() for k in changed},
               **{f"history/{k}": v for k, v in history.items()}}, str(tmp))
    tmp.replace(path)


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """(weights, history) of a checkpoint written by :func:`save_checkpoint`."""
    from safetensors.torch import load_file

    saved = load_file(path)
    return ({k: v for k, v in saved.items() if "/" not in k},
            {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith("history/")})


def norm_ratios(state: dict, base: dict, names) -> dict[str, float]:
    """‖W‖/‖W₀‖ per parameter, in float64 (the curve's ``norm_ratio``)."""
    return {k: float(state[k].double().norm() / base[k].double().norm()) for k in sorted(names)}


def load_targets(path: Path):
    """The :class:`~pipeline.editing.driver.Replay` of a batch written by :func:`save_targets`."""
    from safetensors import safe_open

    from pipeline.editing.driver import Replay
    from pipeline.editing.optimise import ValueResult

    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    passes = []
    for k in range(int(meta["passes"])):
        targets = {name.split("/", 1)[1]: t for name, t in tensors.items() if name.startswith(f"p{k}/") and
                   not name.endswith("/steps")}
        passes.append(ValueResult(targets, {}, {}, tensors[f"p{k}/steps"]))
    return Replay(passes, json.loads(meta["prefixes"]))


def weight_growth(base: dict, edited: dict) -> dict[str, dict[str, float]]:
    """Per edited matrix: Frobenius norm before and after the history and ‖W − W₀‖ / ‖W₀‖, in float64
    so that the ratio does not depend on the weights' dtype."""
    out = {}
    for name in sorted(edited):
        w0, w = base[name].double(), edited[name].double()
        out[name] = {"norm_before": w0.norm().item(), "norm_after": w.norm().item(),
                     "relative_change": ((w - w0).norm() / w0.norm()).item()}
    return out


def save_growth(mdir: Path, base: dict, edited: dict) -> None:
    (mdir / "growth.json").write_text(json.dumps(weight_growth(base, edited), indent=2))


def write_table(rdir: Path, methods: list[str], n: int, batch: int) -> Path:
    """``LIFELONG.md`` in the run directory: progress, final metrics and the retention curve per method."""
    label = stream_label(n, batch, int(rdir.name.rsplit("_s", 1)[1]) if "_s" in rdir.name else 0)
    title = {"smoke": "SMOKE RUN — not a result: ", "tuning": "TUNING RUN (records disjoint from the reported ones): ",
             "": ""}[label]
    lines = [f"# {title}lifelong editing, SmolLM2-135M, "
             f"{n} CounterFact dev edits in {n // batch} sequential batches of {batch}", ""]
    base = rdir / "unedited.json"
    finals = []
    if base.exists():
        finals.append({"method": "unedited", **json.loads(base.read_text())})
    for m in methods:
        curve = read_jsonl(rdir / m / "curve.jsonl")
        final = rdir / m / "final.json"
        wall = sum(r["edit_s"] + r["eval_s"] for r in curve)
        if final.exists():
            f = json.loads(final.read_text())
            finals.append({"method": m, **f["metrics"], "wall_s": wall + f["eval_s"], "batches": len(curve)})
        else:
            finals.append({"method": m, "batches": len(curve), "wall_s": wall})
    cols = ["method", "batches", "efficacy", "generalization", "specificity", "score", "fluency", "me_ppl_50", "wall_s"]
    fmt = lambda x: "—" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)  # noqa: E731
    lines += ["## After the last batch (every edit of the history)", "",
              "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in finals]
    lines += ["", "`—`: not reached yet (a history without its final evaluation has not finished), or fluency skipped (`--skip-fluency`).", "",
              "## Retention curve (after batch t: seeded sample of the edits of batches 1..t-1)", "",
              "| method | batch | edits | own efficacy | own generalization | retained n | retained efficacy "
              "| retained generalization | retained specificity | edit s | eval s | max ‖W‖/‖W₀‖ | ME-PPL-50 |",
              "|" + "---|" * 13]
    for m in methods:
        for r in read_jsonl(rdir / m / "curve.jsonl"):
            own, ret = r["own"], r.get("retention") or {}
            lines.append(f"| {m} | {r['batch']} | {r['edits']} | {fmt(own['efficacy'])} | {fmt(own['generalization'])} "
                         f"| {r['retention_n']} | {fmt(ret.get('efficacy'))} | {fmt(ret.get('generalization'))} "
                         f"| {fmt(ret.get('specificity'))} | {r['edit_s']:.0f} | {r['eval_s']:.0f} "
                         f"| {fmt(r.get('max_norm_ratio'))} | {fmt(r.get('me_ppl_50'))} |")
    growth = {m: json.loads((rdir / m / "growth.json").read_text()) for m in methods if (rdir / m / "growth.json").exists()}
    if growth:
        lines += ["", "## Norm growth of the edited matrices after the last batch", "",
                  "| method | parameter | ‖W₀‖ | ‖W‖ | ‖W − W₀‖ / ‖W₀‖ |", "|---|---|---|---|---|"]
        lines += [f"| {m} | {name} | {g['norm_before']:.1f} | {g['norm_after']:.1f} | {g['relative_change']:.3f} |"
                  for m, rows in growth.items() for name, g in rows.items()]
    path = rdir / "LIFELONG.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def seed_variant(src: Path, dst: Path, n: int, batch: int, start: int) -> None:
    """Start ``dst`` with the batches the same variant made in ``src``, a run on the same first
    records in batches of the same size: its curve rows, targets and settings (the code and
    hyper-parameters it ran with, which the rest of the history must keep)."""
    import shutil

    label = src.parent.name.rsplit("_n", 1)[-1]  # "2000_b100_s0"
    src_n, src_b, src_s = (int(x.lstrip("bs")) for x in label.split("_"))
    if (src_b, src_s) != (batch, start) or src_n > n:
        raise typer.BadParameter(f"--seed-from {src.parent} edits {src_n} records from {src_s} in batches of {src_b}: "
                                 f"not the first batches of {n} from {start} in batches of {batch}")
    rows = read_jsonl(src / "curve.jsonl")
    if not rows:
        raise typer.BadParameter(f"--seed-from: {src} has no batches of this variant")
    (dst / "targets").mkdir(parents=True, exist_ok=True)
    for r in rows:
        shutil.copy2(src / "targets" / f"{r['batch']:04d}.safetensors", dst / "targets" / f"{r['batch']:04d}.safetensors")
    shutil.copy2(src / "settings.json", dst / "settings.json")
    (dst / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    typer.echo(f"{dst.name}: seeded with {len(rows)} batches from {src}")


def head_commit(root: Path = ROOT) -> str | None:
    """The commit whose code is running (a final evaluation may run on newer code than its edits)."""
    import subprocess

    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    return out or None


def check_settings(path: Path, hp, resuming: bool, root: Path = ROOT, editing_left: bool = True) -> None:
    """Pin a history to the hyper-parameters and code it started with: resuming it with others
    would silently mix two settings in one curve.  The code is ``pipeline/`` at the recorded
    commit; after it changed, the rest of a history runs from a worktree of that commit.  A
    history with every batch made (``editing_left`` false) only needs its final evaluation, which
    edits nothing: that may run on newer code (the evaluation is the same to the last printed digit
    across the evaluation-speed change, benchmarks/RESULTS.md), and final.json records which commit ran it."""
    import subprocess
    from dataclasses import asdict

    git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)  # noqa: E731
    if resuming and path.exists():
        saved = json.loads(path.read_text())
        # compared in the canonical form of entry ids: a field added to HParams after the history
        # started reads as its default
        canonical = lambda h: json.loads(json.dumps(h.to_dict()))  # noqa: E731
        now, then = canonical(hp), canonical(type(hp).from_dict(saved["hparams"]))
        if now != then:
            diff = sorted(k for k in now.keys() | then.keys() if now.get(k) != then.get(k))
            raise SystemExit(f"error: {path.parent} was started with other hyper-parameters ({', '.join(diff)}); "
                             f"delete {path.parent} to start it again")
        commit = saved.get("commit")
        changed = git("diff", "--name-only", commit, "--", "pipeline").stdout.split() if commit and editing_left else []
        if changed:
            raise SystemExit(f"error: {path.parent} was started at commit {commit[:10]} and pipeline/ has changed since "
                             f"({', '.join(changed)}); continue it on its own code: git worktree add ../lifelong-code "
                             f"{commit[:10]}, then run benchmarks/lifelong.py there with --out {path.parents[2]}")
        return
    path.write_text(json.dumps({"hparams": json.loads(json.dumps(asdict(hp))), "commit": head_commit(root)}, indent=2)
                    + "\n")


def main(variants: str = "pmet,memit", n: int = FULL_N, batch: int = 100, start: int = 0,
         retention_sample: int = 100, retention_every: int = 1, ppl_every: int = 5,
         hparams: str = "smollm2-135m-instruct", overrides: str = "{}",
         out: Path = ROOT / "benchmarks" / "results", skip_fluency: bool = False, table_only: bool = False,
         growth_only: bool = False, seed_from: Path | None = None):
    """Edit ``n`` requests in batches of ``batch`` with each variant; resumable (see the module doc).
    ``--growth-only`` writes ``growth.json`` for histories that have finished, from their
    checkpoints; it edits nothing, so it runs on any commit.  ``--seed-from RUN_DIR``: a variant
    not started here begins with the batches another run of it already made on the same first
    records (the 10,000-edit stream's first 2,000 edits are the 2,000-edit stream)."""
    if n < 1 or batch < 1 or n % batch:
        raise typer.BadParameter(f"--n ({n}) must be a positive multiple of --batch ({batch})")
    if retention_sample < 1 or retention_every < 1 or ppl_every < 1:
        raise typer.BadParameter("--retention-sample, --retention-every and --ppl-every must be ≥ 1")
    names = [m.strip() for m in variants.split(",") if m.strip()]
    extra = json.loads(overrides)
    hps = {m: variant_hparams(m, hparams, extra) for m in names}  # bad names fail here
    rdir = run_dir(out, n, batch, start)
    rdir.mkdir(parents=True, exist_ok=True)
    if table_only:
        typer.echo(f"wrote {write_table(rdir, names, n, batch)}")
        return

    import torch

    from compare_methods import evaluate_state, generation_tfidf
    from pipeline.data import me_ppl_texts, sample_records
    from pipeline.editing.engine import edit
    from pipeline.editing.history import extended
    from pipeline.evaluation.perplexity import perplexity
    from pipeline.evaluation.protocols import evaluate
    from pipeline.evaluation.retention import Candidate, RetentionSettings, plan
    from pipeline.ledger.atomic import canonical_json
    from pipeline.models.loading import cache_home, load_model
    from pipeline.requests import parse_requests

    code_commit = head_commit()  # the code this process runs (HEAD may move while it does)
    torch.manual_seed(0)
    lm = load_model()
    model, tok = lm.model, lm.tokenizer
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt_root = cache_home() / "benchmarks" / rdir.name
    if growth_only:
        for m in names:
            ckpt = ckpt_root / f"{m}.safetensors"
            if (rdir / m / "final.json").exists() and ckpt.exists():
                save_growth(rdir / m, base_state, load_checkpoint(ckpt)[0])
        typer.echo(f"wrote {write_table(rdir, names, n, batch)}")
        return
    reqs = parse_requests(copy.deepcopy(sample_records("counterfact", start, n)))
    keys = [canonical_json(r.canonical()) for r in reqs]
    texts, tfidf = me_ppl_texts(), generation_tfidf(skip_fluency)
    machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "processor": platform.processor() or platform.machine(),
               "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported())}
    settings = RetentionSettings(sample=retention_sample, full_every=0, generation=False, seed=0)
    unedited = None  # a copy of the base model, for the variants that anchor norms to it

    for m in names:
        method, hp = hps[m]
        mdir = rdir / m
        mdir.mkdir(exist_ok=True)
        (mdir / "machine.json").write_text(json.dumps(machine, indent=2))  # per variant: histories may differ
        curve_path = mdir / "curve.jsonl"
        if seed_from is not None and not curve_path.exists():
            seed_variant(seed_from / m, mdir, n, batch, start)
        curve = read_jsonl(curve_path)
        check_settings(mdir / "settings.json", hp, bool(curve), editing_left=len(curve) < n // batch)
        model.load_state_dict(base_state)
        if hp.norm_anchor and unedited is None:
            unedited = copy.deepcopy(model)
        ckpt = ckpt_root / f"{m}.safetensors"
        changed: set[str] = set()  # parameters the history has written so far (what the checkpoint holds)
        history: dict[str, torch.Tensor] = {}  # Σ KᵀK of every earlier batch (all active in a stream)
        if curve and not ckpt.exists():  # a new session: rebuild the history from its committed targets
            stored = [mdir / "targets" / f"{b + 1:04d}.safetensors" for b in range(len(curve))]
            if missing := [p.name for p in stored if not p.exists()]:
                raise SystemExit(f"error: {curve_path} has {len(curve)} batches but neither the checkpoint {ckpt} nor "
                                 f"the targets {', '.join(missing[:3])} are here; delete {mdir} to start {m} again")
            for b, path in enumerate(stored):
                t0 = time.perf_counter()
                res = edit(model, tok, reqs[b * batch:(b + 1) * batch], method=method, hparams=hp, apply=True,
                           fingerprint=lm.fingerprint, progress=False, history=history or None, replay=load_targets(path))
                history = extended(history, res.keys)
                changed |= set(res.deltas)
                state = model.state_dict()
                ratios = norm_ratios(state, base_state, curve[b]["norm_ratio"])
                drift = max(abs(ratios[k] - r) for k, r in curve[b]["norm_ratio"].items())
                typer.echo(f"{m}: rebuilt batch {b + 1}/{len(curve)} from its targets in {time.perf_counter() - t0:.0f} s "
                           f"(‖W‖/‖W₀‖ off the recorded curve by {drift:.1e})")
                if drift > 1e-4:
                    raise SystemExit(f"error: batch {b + 1} of {m} rebuilt from its targets has ‖W‖/‖W₀‖ {drift:.1e} "
                                     "off the recorded curve: not the same history (other code or machine)")
            save_checkpoint(ckpt, state, changed, history)
        elif curve:
            weights, history = load_checkpoint(ckpt)
            model.load_state_dict(weights, strict=False)
            changed = set(weights)
        for b in range(len(curve), n // batch):
            lo, hi = b * batch, (b + 1) * batch
            t0 = time.perf_counter()
            res = edit(model, tok, reqs[lo:hi], method=method, hparams=hp, apply=True, fingerprint=lm.fingerprint,
                       progress=False, history=history or None, unedited=unedited)
            edit_s = time.perf_counter() - t0
            history = extended(history, res.keys)
            t0 = time.perf_counter()
            own, _ = evaluate(model, tok, reqs[lo:hi])
            chosen = []
            if (b + 1) % retention_every == 0 or b + 1 == n // batch:
                chosen = plan(b + 1, [Candidate(f"{i // batch:04d}", i, keys[i]) for i in range(lo)], settings).chosen
            ret = evaluate(model, tok, [reqs[c.index] for c in chosen])[0] if chosen else None
            changed |= set(res.deltas)
            state = model.state_dict()
            norms = norm_ratios(state, base_state, changed)
            ppl = perplexity(model, tok, texts) if (b + 1) % ppl_every == 0 else None
            row = {"batch": b + 1, "edits": hi, "edit_s": edit_s, "eval_s": time.perf_counter() - t0,
                   "mean_steps": sum(res.steps) / len(res.steps), "own": pick(own), "retention_n": len(chosen),
                   "retention": pick(ret) if ret else None, "norm_ratio": norms,
                   "max_norm_ratio": max(norms.values()), "me_ppl_50": ppl}
            save_checkpoint(ckpt, state, changed, history)  # checkpoint and targets first: a row always has them
            save_targets(mdir / "targets" / f"{b + 1:04d}.safetensors", res)
            append_jsonl(curve_path, row)
            typer.echo(f"{m}: batch {b + 1}/{n // batch} edit {edit_s:.0f} s, own efficacy {own['efficacy']:.2f}, "
                       f"retained efficacy {row['retention']['efficacy'] if ret else float('nan'):.2f}, "
                       f"max ‖W‖/‖W₀‖ {row['max_norm_ratio']:.3f}" + (f", ME-PPL-50 {ppl:.1f}" if ppl else ""))
        final = mdir / "final.json"
        if not final.exists():
            t0 = time.perf_counter()
            row = evaluate_state(model, tok, reqs, None, texts, tfidf)
            final.write_text(json.dumps({"metrics": row, "eval_s": time.perf_counter() - t0, "machine": machine,
                                         "commit": code_commit}, indent=2))
        state = model.state_dict()
        save_growth(mdir, base_state, {k: state[k] for k in changed})
        write_table(rdir, names, n, batch)
    model.load_state_dict(base_state)
    # last, so that two processes editing one variant each do not both spend the time on it
    if not (rdir / "unedited.json").exists():
        t0 = time.perf_counter()
        row = evaluate_state(model, tok, reqs, None, texts, tfidf, lm.fingerprint)
        (rdir / "unedited.json").write_text(json.dumps({**row, "eval_s": time.perf_counter() - t0}, indent=2))
    typer.echo(f"wrote {write_table(rdir, names, n, batch)}")


if __name__ == "__main__":
    typer.run(main)
