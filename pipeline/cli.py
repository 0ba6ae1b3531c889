"""The ``editledger`` command line (thin: parse, validate, call the library, write artifacts)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Lifelong, auditable knowledge editing of language models.")


class UserError(Exception):
    """An error whose message is all the user needs (printed without a traceback)."""


def _fail(msg: str) -> None:
    """One line on stderr (multi-line messages of libraries, e.g. YAML parse errors, are joined), exit 2."""
    line = " | ".join(part.strip() for part in str(msg).splitlines() if part.strip())
    typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _user_errors():
    """Exception types that are the user's input, not a bug: shown as one line, exit code 2."""
    from pipeline.config import ParamsError
    from pipeline.corpus import CorpusError
    from pipeline.distributed import DistributedError
    from pipeline.editing.covariance import CovarianceCacheError
    from pipeline.editing.hparams import HParamsError
    from pipeline.editing.methods import MethodError
    from pipeline.requests import RequestError
    from pipeline.editing.optimise import OptimisationError
    from pipeline.models.adapters import AdapterError
    from pipeline.models.loading import ModelLoadError

    from pipeline.data import DataError
    from pipeline.export.files import ExportError
    from pipeline.ledger.errors import LedgerError
    from pipeline.stages.audit import LogFilterError
    from pipeline.stages.common import StageError
    from pipeline.stages.probes import ProbeError

    return (DataError, ParamsError, HParamsError, MethodError, RequestError, AdapterError, ModelLoadError,
            CovarianceCacheError, OptimisationError, LedgerError, StageError, ProbeError, ExportError, UserError,
            FileNotFoundError, LogFilterError, CorpusError, DistributedError)


def _guard(fn, *args, **kwargs):
    """Run ``fn``; a user error becomes one red line on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except _user_errors() as exc:
        _fail(str(exc))


@app.command()
def setup(model: str = typer.Option(None, help="built-in model name (default: smollm2-135m-instruct)")):
    """Prepare the default model (dequantise the packaged GGUF once) and print where it is."""
    from pipeline.models.loading import load_model

    try:
        lm = load_model(model)
    except _user_errors() as exc:
        _fail(str(exc))
    typer.echo(f"model: {lm.path}\nfingerprint: {lm.fingerprint}")


@app.command()
def sample(
    dataset: str = typer.Option("counterfact", "--dataset", help="counterfact | zsre"),
    start: int = typer.Option(0, "--start"),
    n: int = typer.Option(100, "--n"),
    out: Path = typer.Option(..., "--out"),
):
    """Write records START..START+N of a verified shared dataset as a requests file."""
    from pipeline.data import DataError, sample_records

    try:
        records = sample_records(dataset, start, n)
    except DataError as exc:
        _fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1, ensure_ascii=False))
    typer.echo(f"wrote {len(records)} {dataset} records to {out}")


@app.command()
def edit(
    requests: Path = typer.Option(..., "--requests", help="JSON list of CounterFact / zsRE records"),
    out: Path = typer.Option(..., "--out", help="output directory (must not exist or be empty)"),
    method: str = typer.Option(None, "--method", help="pmet | memit | jeep | an ablation (see README; default: params)"),
    model: str = typer.Option(None, "--model", help="local HF model directory (default: params, else SmolLM2-135M-Instruct)"),
    params: Path = typer.Option(None, "--params", help="params.yaml (default: built-in defaults)"),
    engine: str = typer.Option(None, "--engine", help="fast | reference (default: params)"),
    save_model: bool = typer.Option(False, "--save-model", help="also write the edited HF model to OUT/model"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    iterative: bool = typer.Option(None, "--iterative/--no-iterative", help="iterative editing (default: params)"),
    neighbors: int = typer.Option(None, "--neighbors", help="neighbour-assisted editing with N neighbours (0 = off)"),
):
    """Edit a batch of facts into the model; write metrics.json, deltas.safetensors and traces."""
    try:
        _edit(requests, out, method, model, params, engine, save_model, progress, iterative, neighbors)
    except _user_errors() as exc:
        _fail(str(exc))


def _edit(requests_path, out, method, model_path, params_path, engine, save_model, progress, iterative=None,
          neighbors=None):
    import torch

    from pipeline.config import load_params, modifier_overrides
    from pipeline.corpus import Corpus
    from pipeline.editing.engine import default_corpus
    from pipeline.editing.engine import edit as run_edit
    from pipeline.editing.targets import ENGINES
    from pipeline.models.weights import apply_deltas
    from pipeline.editing.hparams import load_hparams
    from pipeline.editing.methods import get_method
    from pipeline.requests import load_requests
    from pipeline.evaluation.protocols import evaluate
    from pipeline.models.loading import load_model
    from pipeline.artifacts import write_edit_outputs

    # --- everything checkable without the model, before loading it
    cfg = load_params(params_path)
    method = method or cfg["edit"]["method"]
    engine = engine or cfg["edit"]["engine"]
    spec = get_method(method)
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    from pipeline.editing.neighbors import check_neighbor_requests

    hp = load_hparams(cfg["edit"]["hparams"], spec.hparams_from, modifier_overrides(cfg, iterative, neighbors))
    reqs = load_requests(requests_path)
    check_neighbor_requests(reqs, hp.neighbors)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} exists and is not empty")
    corpus = Corpus.configured(cfg["corpus"], default_corpus())

    torch.manual_seed(cfg["seed"])
    lm = load_model(model_path or cfg["model"]["path"], device=cfg["model"]["device"], dtype=cfg["model"]["dtype"])
    result = run_edit(lm.model, lm.tokenizer, reqs, method=method, hparams=hp, engine=engine, corpus=corpus,
                      cache_dir=cfg["cache_dir"], fingerprint=lm.fingerprint, progress=progress)
    # evaluated after edit() (which leaves the model alone) so that the neighbours used by
    # neighbour-assisted editing are left out of specificity before and after alike
    t0 = time.perf_counter()
    pre, pre_rows = evaluate(lm.model, lm.tokenizer, reqs, result.editing_neighbors)
    t_pre = time.perf_counter() - t0
    apply_deltas(lm.model, result.deltas)
    t0 = time.perf_counter()
    post, post_rows = evaluate(lm.model, lm.tokenizer, reqs, result.editing_neighbors)
    t_post = time.perf_counter() - t0
    result.timings.update({"evaluate_pre_s": t_pre, "evaluate_post_s": t_post})
    write_edit_outputs(out, lm, reqs, result, pre, post, pre_rows, post_rows, save_model=save_model)
    summary = "  ".join(f"{k} {pre[k]:.3f}→{post[k]:.3f}" for k in ("efficacy", "generalization", "specificity"))
    typer.echo(f"{method}: {len(reqs)} requests  {summary}\nwrote {out}")


# ------------------------------------------------------------------------------------------- ledger

def _project():
    from pipeline.stages.project import Project

    return Project.find()


def _rel(project, path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(project.root))
    except ValueError:
        return str(path)


@app.command()
def add(
    requests: Path = typer.Option(..., "--requests", help="JSON list of CounterFact / zsRE records"),
    method: str = typer.Option(None, "--method", help="editing method (default: params edit.method)"),
    params: Path = typer.Option(None, "--params", help="params.yaml (default: the project's)"),
    iterative: bool = typer.Option(None, "--iterative/--no-iterative", help="iterative editing (default: params)"),
    neighbors: int = typer.Option(None, "--neighbors", help="neighbour-assisted editing with N neighbours (0 = off)"),
):
    """Append a batch of edit requests to the ledger (computed by `dvc repro -P`)."""
    _guard(_add, requests, method, params, iterative, neighbors)


def _add(requests_path, method, params_path, iterative=None, neighbors=None):
    from pipeline.requests import load_requests
    from pipeline.ledger import add_edit
    from pipeline.stages.dvcfile import batch_dvc_yaml
    from pipeline.stages.common import check_covariance_config, check_layers, resolve_hparams

    project = _project()
    cfg = project.params(params_path)
    method = method or cfg["edit"]["method"]
    from pipeline.editing.neighbors import check_neighbor_requests

    spec, hp = resolve_hparams(project, cfg, method, iterative, neighbors)
    check_layers(project, cfg, hp)
    check_covariance_config(cfg, spec, hp)
    reqs = load_requests(requests_path)
    check_neighbor_requests(reqs, hp.neighbors)
    _auto_checkpoint(project, cfg["ledger"]["checkpoint_every"])
    path = add_edit(project.ledger, reqs, spec.name, hp, engine=cfg["edit"]["engine"], seed=cfg["seed"],
                    stage_file=batch_dvc_yaml)
    typer.echo(f"added {_rel(project, path)}: {len(reqs)} requests, {spec.name}{hp.modifier_label}; "
               "`dvc repro -P` computes it")


@app.command()
def revert(ref: str = typer.Argument(..., metavar="ID", help="entry (seq, directory, id prefix) or 'base'")):
    """Append a revert: the active state becomes the state right after ID."""
    from pipeline.ledger import add_revert
    from pipeline.stages.dvcfile import batch_dvc_yaml

    project = _project()
    path = _guard(add_revert, project.ledger, ref, batch_dvc_yaml)
    typer.echo(f"added {_rel(project, path)} (revert to {ref}); `dvc repro -P` computes it")


@app.command()
def drop(
    ref: str = typer.Argument(..., metavar="ID", help="edit entry to remove (seq, directory, id prefix)"),
    fast: bool = typer.Option(False, "--fast", help="subtract its delta (approximate) instead of re-applying later batches"),
):
    """Append entries that remove one batch from the active state."""
    from pipeline.ledger import add_drop
    from pipeline.stages.dvcfile import batch_dvc_yaml

    project = _project()
    paths = _guard(add_drop, project.ledger, ref, "fast" if fast else "exact", batch_dvc_yaml)
    what = "fast (approximate)" if fast else f"exact, re-applying {len(paths) - 1} later batch(es)"
    for p in paths:
        typer.echo(f"added {_rel(project, p)}")
    typer.echo(f"drop of {ref}: {what}; `dvc repro -P` computes it")


@app.command()
def log(as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
        method: str = typer.Option(None, "--method", help="only batches edited with METHOD"),
        status: str = typer.Option(None, "--status", help="only batches with STATUS (committed, refused, pending, "
                                                          "superseded, ...)"),
        since: str = typer.Option(None, "--since", help="only entries committed on or after DATE (YYYY-MM-DD)"),
        until: str = typer.Option(None, "--until", help="only entries committed on or before DATE (YYYY-MM-DD)"),
        subject: str = typer.Option(None, "--subject", help="only batches whose requests name SUBJECT")):
    """List the ledger's batches: ids, kind, method, status, active, metrics."""
    df = _guard(_log_table, method, status, since, until, subject)
    if as_json:
        typer.echo(df.astype(object).where(df.notna(), None).to_json(orient="records", indent=1))
        return
    if df.empty:
        typer.echo("the ledger is empty (add a batch with `editledger add --requests FILE`)")
        return
    typer.echo(f"{'seq':>4}  {'directory':<17}  {'id':<12}  {'kind':<10}  {'method':<20}  {'n':>4}  {'status':<11}  "
               f"{'active':<6}  {'eff pre→post':<13}  {'gen':<5}  {'spec':<5}")
    for r in df.astype(object).where(df.notna(), None).itertuples(index=False):
        what = (f"{r.method}{r.modifiers or ''}" if r.kind == "edit" else f"→ {r.target}" if r.kind == "revert"
                else "(state kept whole)" if r.kind == "checkpoint" else f"{r.mode} {r.target}")
        f = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        eff = f"{f(r.pre_efficacy)}→{f(r.post_efficacy)}" if r.post_efficacy is not None else ""
        typer.echo(f"{r.seq:>4}  {r.dir:<17}  {(r.id or '')[:12]:<12}  {r.kind or '?':<10}  {str(what)[:20]:<20}  "
                   f"{'' if r.n_requests is None else r.n_requests:>4}  {r.status:<11}  "
                   f"{'' if r.active is None else 'yes' if r.active else 'no':<6}  {eff:<13}  "
                   f"{f(r.post_generalization):<5}  {f(r.post_specificity):<5}")


def _log_table(method, status, since, until, subject):
    """The log's rows, filtered (every filter given must hold)."""
    from pipeline.stages.audit import filter_log
    from pipeline.stages.summary import ledger_table

    ledger = _project().ledger
    return filter_log(ledger_table(ledger), ledger, method=method, status=status, since=since, until=until,
                      subject=subject)


@app.command()
def blame(subject: str = typer.Argument(..., metavar="SUBJECT", help="the subject, as written in the requests"),
          relation: str = typer.Option(None, "--relation", help="only requests of this relation id (e.g. P103)"),
          as_json: bool = typer.Option(False, "--json", help="machine-readable output")):
    """Every entry whose requests name SUBJECT (active or not), and what the model answers now."""
    from pipeline.stages.audit import blame_report

    report = _guard(blame_report, _project(), subject, relation)
    if as_json:
        typer.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    typer.echo(f"{subject}: {len(report['entries'])} request(s) in the ledger")
    for r in report["entries"]:
        state = "active" if r["active"] else f"not active ({r['removed_by']})" if r["removed_by"] else "not active"
        typer.echo(f"  {r['seq']:04d} {r['dir']}  {(r['id'] or '')[:12]:<12}  {r['method']:<10} {r['status']:<11} "
                   f"{r['created_at'] or 'not computed':<20}  {r['prompt']}: {r['target_true'] or '?'} → {r['target_new']}"
                   f"  [{r['relation_id'] or '-'}]  {state}")
    for prompt, ans in report["answers"].items():
        for side in ("active", "base"):
            a = ans[side]
            probs = ", ".join(f"{c} {p:.3f}" for c, p in sorted(a["probs"].items(), key=lambda kv: -kv[1]))
            typer.echo(f"  now, {side} model: {prompt} → {a['answer']}  ({probs})")


@app.command()
def show(ref: str = typer.Argument(..., metavar="ID")):
    """Print one entry: content, manifest (fingerprints, timings, versions) and evaluation, as JSON."""
    from pipeline.ledger import read_evaluation
    from pipeline.ledger import show as find

    def _show():
        entry = find(_project().ledger, ref)
        return {**entry.summary(), "evaluation": read_evaluation(entry)}

    typer.echo(json.dumps(_guard(_show), indent=2, ensure_ascii=False))


@app.command()
def diff(a: str = typer.Argument(..., metavar="A"), b: str = typer.Argument(..., metavar="B"),
         as_json: bool = typer.Option(False, "--json")):
    """Compare the states after A and B: requests added/removed, per-layer delta norms, metric changes."""
    from pipeline.ledger import diff as ledger_diff

    d = _guard(ledger_diff, _project().ledger, a, b)
    if as_json:
        typer.echo(json.dumps(d.to_dict(), indent=2, ensure_ascii=False))
        return
    typer.echo(f"{a} → {b}: {len(d.b.active)} active batch(es) after {b}, {len(d.a.active)} after {a}")
    for sign, reqs in (("+", d.requests_added), ("-", d.requests_removed)):
        for r in reqs:
            typer.echo(f"  {sign} {r['prompt'].replace('{}', r['subject'])} → {r['target_new']}")
    typer.echo("delta norm from the base, per layer:")
    for layer in sorted(set(d.a.layer_norms) | set(d.b.layer_norms), key=lambda x: (len(x), x)):
        typer.echo(f"  layer {layer:>5}: {d.a.layer_norms.get(layer, 0.0):10.4f} → {d.b.layer_norms.get(layer, 0.0):10.4f}")
    for k, row in d.metric_changes.items():
        change = f" ({row['change']:+.3f})" if "change" in row else ""
        typer.echo(f"  {k}: {row['a']} → {row['b']}{change}")


@app.command()
def materialize(ref: str = typer.Argument(..., metavar="ID", help="entry, or 'base'"),
                out: Path = typer.Argument(..., metavar="DIR", help="new (or empty) directory")):
    """Write the model in the state right after ID as a loadable Hugging Face directory."""
    _guard(_materialize, ref, out)


def _materialize(ref, out):
    from pipeline.ledger import materialize as rebuild
    from pipeline.models.loading import model_fingerprint
    from pipeline.stages.common import base_model, write_json

    project = _project()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} exists and is not empty")
    lm = base_model(project)
    model = rebuild(project.ledger, ref, lm.model, inplace=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        write_json(tmp / "editledger.json", {"ledger_ref": ref, "fingerprint": model_fingerprint(model)})
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    typer.echo(f"wrote the state after {ref} to {out}")


@app.command("export")
def export_state(
    ref: str = typer.Argument(..., metavar="ID", help="entry (seq, directory, id prefix) or 'head'"),
    out: Path = typer.Argument(..., metavar="OUT", help="peft: new (or empty) directory; gguf: new file (OUT.gguf)"),
    fmt: str = typer.Option(..., "--format", help="peft (LoRA adapter on the base model) | gguf (the whole model)"),
    dtype: str = typer.Option("f32", "--dtype", help="gguf: f32 | f16 (peft: f32)"),
    rtol: float = typer.Option(None, "--rtol", help="peft: rank tolerance relative to the largest singular value "
                                                     "(default max(m, n)·ε_float32)"),
    check: bool = typer.Option(True, "--check/--no-check", help="read the export back (PEFT / transformers) and "
                                                                "compare logits before writing it"),
):
    """Write the state after ID as a PEFT LoRA adapter or a GGUF file (checked by reading it back)."""
    from pipeline.export import ExportRequest
    from pipeline.stages.export import run_export

    req = ExportRequest(ref, fmt, out, dtype, rtol, check)
    r = _guard(run_export, _project(), req)
    if fmt == "peft":
        ranks = sorted({m["rank"] for m in r["modules"].values()})
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
        what = f"PEFT LoRA adapter, {len(r['modules'])} matrices of rank {rank}, {r['lora_parameters']:,} parameters"
    else:
        what = f"GGUF {dtype}, {r['tensors']} tensors, metadata {r['metadata']}"
    typer.echo(f"wrote {out}: the state after entry {r['entry_dir']} ({r['entry_id'][:12]}) as a {what}; "
               f"{r['bytes']:,} bytes (base model: {r['model_parameters']:,} parameters)")
    if "round_trip" in r:
        rt = r["round_trip"]
        typer.echo(f"read back with {rt['reader']}: max |Δ logit| {rt['max_abs_diff']:.3g} ≤ {rt['tolerance']:.3g} "
                   f"on {rt['tokens']} tokens" + (f" (float16 storage itself: {rt['rounding_max_abs_diff']:.3g})"
                                                   if "rounding_max_abs_diff" in rt else ""))


@app.command()
def verify(replay: bool = typer.Option(False, "--replay", help="also rebuild the weights and check them bit for bit"),
           full: bool = typer.Option(False, "--full", help="from the first entry, not the last checkpoint; checks "
                                                           "every checkpoint against the chain before it")):
    """Recompute the hash chain (and with --replay the weights); exit 1 naming the first bad entry."""
    from pipeline.ledger import verify as check

    def load_base():
        from pipeline.stages.common import base_model  # the model code, only when weights are replayed

        return base_model(project).model

    project = _project()
    result = _guard(check, project.ledger, replay=replay, load_base=load_base, full=full)
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    if not result.ok:
        typer.secho(result.message(), fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(result.message())


@app.command()
def report(out: Path = typer.Option(Path("reports/latest"), "--out", help="output directory"),
           as_json: bool = typer.Option(False, "--json", help="print the headline numbers as JSON")):
    """Write the history report: index.html (self-contained: plots embedded, renders offline),
    summary.parquet (row 0 = the unedited model, then one row per batch), summary.json, history.csv;
    print its headline numbers in a few lines."""
    from pipeline.stages.summary import summary_lines, write_summary

    project = _project()
    out = out if out.is_absolute() else Path.cwd() / out
    metrics = _guard(write_summary, project.ledger, out)
    if as_json:
        typer.echo(json.dumps(metrics, indent=2))
        return
    for line in summary_lines(metrics):
        typer.echo(line)
    shown = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    typer.echo(f"report: {shown / 'index.html'}   (these numbers as JSON: editledger report --json)")


# ------------------------------------------------------------------------------------ collaboration

def _upstream_dirs(project, ref: str | None) -> tuple[str, list[str]]:
    """The batch directories of the upstream side of a merge: ``ref`` (a git revision), else the
    merge in progress (``MERGE_HEAD``), else the branch's upstream (``@{upstream}``)."""
    import subprocess

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(project.root), *args], capture_output=True, text=True)

    if ref is None:
        ref = "MERGE_HEAD" if git("rev-parse", "-q", "--verify", "MERGE_HEAD").returncode == 0 else "@{upstream}"
    found = git("ls-tree", "-d", "--name-only", f"{ref}:ledger")
    if found.returncode != 0:
        raise UserError(f"cannot read upstream's ledger at git revision {ref!r} ({found.stderr.strip() or 'no ledger/'}); "
                        "name upstream with --upstream REF (e.g. origin/main)")
    return ref, found.stdout.split()


@app.command()
def rebase(
    upstream: str = typer.Option(None, "--upstream", help="git revision of upstream (default: the merge in progress, "
                                                          "else the branch's upstream)"),
    skip: list[str] = typer.Option([], "--skip", help="leave this clone's batch DIR out (repeatable)"),
    keep_local: bool = typer.Option(False, "--keep-local", help="re-append fact conflicts anyway (this clone's edit wins)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan, change nothing"),
):
    """Resolve a forked ledger: keep upstream's batches, re-append this clone's after them."""
    _guard(_rebase, upstream, skip, keep_local, dry_run)


def _rebase(upstream, skip, keep_local, dry_run):
    from pipeline.ledger.rebase import plan_rebase
    from pipeline.ledger.rebase import rebase as run_rebase
    from pipeline.stages.dvcfile import batch_dvc_yaml

    project = _project()
    ref, dirs = _upstream_dirs(project, upstream)
    if dry_run:
        plan = plan_rebase(project.ledger, dirs, skip=skip, keep_local=keep_local)
    else:
        plan = run_rebase(project.ledger, dirs, skip=skip, keep_local=keep_local, stage_file=batch_dvc_yaml)
    typer.echo(f"upstream ({ref}) ends at {plan.onto}; fork point {plan.fork_point or 'none (no common batch)'}; "
               f"{len(plan.upstream_after)} upstream and {len(plan.local)} local batch(es) since")
    for old, new in plan.mapping.items():
        typer.echo(f"  {old} → ledger/{new}")
    for old in plan.skipped:
        typer.echo(f"  {old} left out (--skip)")
    typer.echo("dry run: nothing changed" if dry_run else
               "re-appended; `dvc repro -P` computes the new batches (the originals stay, marked superseded)")


# ------------------------------------------------------------------------------------- checkpoints

def _auto_checkpoint(project, every: int | None) -> None:
    """``ledger.checkpoint_every`` of params.yaml: append a checkpoint before the batch when due."""
    from pipeline.ledger.append import add_checkpoint, checkpoint_due
    from pipeline.stages.dvcfile import batch_dvc_yaml

    if checkpoint_due(project.ledger, every):
        path = add_checkpoint(project.ledger, batch_dvc_yaml)
        typer.echo(f"added {_rel(project, path)}: checkpoint after {every} batches (ledger.checkpoint_every)")


@app.command()
def checkpoint():
    """Append a checkpoint: the current state kept whole, the batches before it sealed (flat costs)."""
    from pipeline.ledger.append import add_checkpoint
    from pipeline.stages.dvcfile import batch_dvc_yaml

    project = _project()
    path = _guard(add_checkpoint, project.ledger, batch_dvc_yaml)
    typer.echo(f"added {_rel(project, path)} (checkpoint); `dvc repro -P` computes it")


# ------------------------------------------------------------------------------------------- probes

probe_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Probes of the knowledge-recall process on CounterFact records (Parquet + PNG).")
app.add_typer(probe_app, name="probe")


def _probe(kind: str, start: int, n: int, out: Path, model_path: str | None, params_path: Path | None) -> None:
    from pipeline.config import load_params
    from pipeline.models.loading import load_model
    from pipeline.stages.probes import records_for, run_probe

    cfg = load_params(params_path)
    records = records_for(start, n)  # checked before the model is loaded
    lm = load_model(model_path or cfg["model"]["path"], device=cfg["model"]["device"], dtype=cfg["model"]["dtype"])
    path = run_probe(kind, lm.model, lm.tokenizer, records, out)
    typer.echo(f"{kind}: {n} CounterFact records ({start}..{start + n - 1}) → {path} and {path.with_suffix('.png')}")


_PROBE_START = typer.Option(0, "--start", help="first CounterFact record")
_PROBE_N = typer.Option(100, "--n", help="number of records")
_PROBE_OUT = typer.Option(Path("reports/probes"), "--out", help="output directory")
_PROBE_MODEL = typer.Option(None, "--model", help="local HF model directory (default: params, else SmolLM2-135M)")
_PROBE_PARAMS = typer.Option(None, "--params", help="params.yaml (model path, device, dtype)")


@probe_app.command("similarity")
def probe_similarity(start: int = _PROBE_START, n: int = _PROBE_N, out: Path = _PROBE_OUT,
                     model: str = _PROBE_MODEL, params: Path = _PROBE_PARAMS):
    """PMET §3.2: cosine and top-50 Jaccard of the last token's state before/after attention and MLP, per layer."""
    _guard(_probe, "similarity", start, n, out, model, params)


@probe_app.command("logit-lens")
def probe_logit_lens(start: int = _PROBE_START, n: int = _PROBE_N, out: Path = _PROBE_OUT,
                     model: str = _PROBE_MODEL, params: Path = _PROBE_PARAMS):
    """JEEP §4.1: probability and rank of the original vs target answer per layer (subject-last, prediction)."""
    _guard(_probe, "logit-lens", start, n, out, model, params)


# ------------------------------------------------------------------------------------ DVC stages

stage_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Run one DVC stage (the dvc.yaml files call these; `dvc repro -P` runs them all).")
app.add_typer(stage_app, name="stage")


@stage_app.command("model")
def stage_model():
    """Materialise the base model into data/model and record its fingerprint in data/model.json."""
    from pipeline.stages import model as stage

    info = _guard(stage.run, _project())
    typer.echo(f"base model {info['model_type']} ({info['n_parameters']:,} parameters): {info['fingerprint']}")


@stage_app.command("data")
def stage_data(shared: Path = typer.Option(Path("../shared/data"), "--shared", help="shared data mirror")):
    """Verify the shared datasets against SHA256SUMS and convert them to Parquet under data/."""
    from pipeline.stages import data as stage

    counts = _guard(stage.run, _project(), shared)
    typer.echo("verified and converted: " + ", ".join(f"{k} ({v} records)" for k, v in counts.items()))


@stage_app.command("covariance")
def stage_covariance(role: str = typer.Option(..., "--role"), layer: int = typer.Option(..., "--layer"),
                     progress: bool = typer.Option(True, "--progress/--no-progress")):
    """Key second moment of one edited projection, into data/covariance/ROLE-LAYER/."""
    from pipeline.stages import covariance as stage

    kid = _guard(stage.run, _project(), role, layer, progress)
    typer.echo(f"covariance {role}@{layer}: {kid}")


@stage_app.command("keys-values")
def stage_keys_values(batch: Path = typer.Option(Path("."), "--batch", help="the batch directory")):
    """Optimise the target values of an edit batch on its parent state."""
    from pipeline.stages import keys_values as stage

    info = _guard(stage.run, batch)
    typer.echo(f"{Path(batch).resolve().name}: targets of {info['requests']} requests (steps {info['steps']})")


@stage_app.command("apply")
def stage_apply(batch: Path = typer.Option(Path("."), "--batch", help="the batch directory")):
    """Compute a batch's weight change and commit its entry (state.json last)."""
    from pipeline.stages import apply as stage

    entry = _guard(stage.run, batch)
    if entry.refused:
        g = entry.metrics["guard"]
        typer.echo(f"{entry.dirname}: REFUSED by the collapse guard (ME-PPL ratio {g['ratio']} > "
                   f"{g['max_ppl_ratio']}); recorded as entry {entry.id}, the previous state stays active")
        return
    typer.echo(f"{entry.dirname}: committed {entry.kind} entry {entry.id}")


@stage_app.command("evaluate")
def stage_evaluate(batch: Path = typer.Option(Path("."), "--batch", help="the batch directory")):
    """Evaluate an edit batch's requests before and after it; write eval.parquet and metrics.json."""
    from pipeline.stages import evaluate as stage

    doc = _guard(stage.run, batch)
    pre, post, ppl, t = doc["pre"], doc["post"], doc["perplexity"], doc["timings"]
    typer.echo(f"{doc['dir']}: " + "  ".join(f"{k} {pre[k]:.3f}→{post[k]:.3f}" for k in ("efficacy", "generalization",
                                                                                          "specificity"))
               + f"  ME-PPL-50 {ppl['base']:.1f}→{ppl['post']:.1f}  ({t['total_s']:.0f} s)")


@stage_app.command("probe")
def stage_probe(kind: str = typer.Option(..., "--kind", help="similarity | logit-lens")):
    """A probe on the base model over params.yaml's probes.start/probes.n records → reports/probes/."""
    from pipeline.stages.common import base_model
    from pipeline.stages.probes import records_for, run_probe

    def _run():
        project = _project()
        cfg = project.params()
        records = records_for(cfg["probes"]["start"], cfg["probes"]["n"])
        lm = base_model(project)
        return run_probe(kind, lm.model, lm.tokenizer, records, project.root / "reports" / "probes")

    typer.echo(f"wrote {_guard(_run)}")


@stage_app.command("export")
def stage_export(fmt: str = typer.Option(..., "--format", help="peft | gguf")):
    """The state after params.yaml's export.entry as exports/<format>/ (the optional export stage)."""
    from pipeline.stages import export as stage

    r = _guard(stage.run, _project(), fmt)
    typer.echo(f"exports/{fmt}: the state after entry {r['entry_dir']} ({r['entry_id'][:12]}), {r['bytes']:,} bytes")


# ------------------------------------------------------------------ on a cluster (torchrun -m pipeline ...)

@app.command()
def covariance(
    params: Path = typer.Option(None, "--params", help="params.yaml: model, corpus, edit.method/hparams (default: built-in)"),
    model: str = typer.Option(None, "--model", help="local HF model directory (default: params, else SmolLM2-135M-Instruct)"),
    method: str = typer.Option(None, "--method", help="the method whose written layers are computed (default: params)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Compute the key covariances an edit with METHOD needs into the cache, over params.yaml's corpus.
    Under `torchrun --nproc-per-node N -m pipeline covariance ...` the N processes share the corpus."""
    _guard(_covariance, params, model, method, progress)


def _load_for_rank(path: str | None, cfg: dict):
    """The model on this rank's device; rank 0 prepares a built-in model first (once, not N times)."""
    from pipeline import distributed
    from pipeline.models.loading import load_model, resolve_model_path

    device = distributed.init(cfg["model"]["device"])
    where = distributed.broadcast(str(resolve_model_path(path)) if distributed.is_main() else None, "loading the model")
    return load_model(where, device=device, dtype=cfg["model"]["dtype"])


def _covariance(params_path, model_path, method, progress):
    from pipeline import distributed
    from pipeline.config import load_params, modifier_overrides
    from pipeline.corpus import Corpus
    from pipeline.editing.covariance import cut_of, second_moments
    from pipeline.editing.engine import default_corpus
    from pipeline.editing.hparams import load_hparams
    from pipeline.editing.methods import get_method
    from pipeline.editing.spread import written_projections
    from pipeline.models.adapters import adapter_for
    from pipeline.models.loading import cache_home

    cfg = load_params(params_path)
    spec = get_method(method or cfg["edit"]["method"])
    hp = load_hparams(cfg["edit"]["hparams"], spec.hparams_from, modifier_overrides(cfg))
    corpus = Corpus.configured(cfg["corpus"], default_corpus())
    lm = _load_for_rank(model_path or cfg["model"]["path"], cfg)
    adapter = adapter_for(lm.model)
    targets = written_projections(spec.resolve(hp))
    for _, layer in targets:
        adapter.check_layer(lm.model, layer)
    cache = Path(cfg["cache_dir"]) if cfg["cache_dir"] else cache_home() / "covariance"
    t0 = time.perf_counter()
    _, ids = second_moments(lm.model, lm.tokenizer, adapter, lm.fingerprint, corpus, targets, cut_of(hp),
                            hp.cov_batch_tokens, hp.cov_dtype, cache, progress)
    if distributed.is_main():
        for (role, layer), kid in ids.items():
            typer.echo(f"covariance {role}@{layer}: {kid}")
        typer.echo(f"{len(ids)} entries in {cache} (processes: {distributed.size()}, {time.perf_counter() - t0:.1f} s)")


@app.command("evaluate")
def evaluate_command(
    requests: Path = typer.Option(..., "--requests", help="JSON list of CounterFact / zsRE records"),
    out: Path = typer.Option(..., "--out", help="output directory (must not exist or be empty)"),
    model: str = typer.Option(None, "--model", help="local HF model directory (default: params, else SmolLM2-135M-Instruct)"),
    params: Path = typer.Option(None, "--params", help="params.yaml: its evaluation: settings (default: built-in)"),
    ppl: bool = typer.Option(True, "--perplexity/--no-perplexity", help="also ME-PPL-50 (the shared data)"),
):
    """Evaluate a model on requests (CounterFact/zsRE protocol, fluency, consistency, ME-PPL-50);
    write metrics.json and eval.parquet.  Under `torchrun --nproc-per-node N -m pipeline evaluate ...`
    the N processes share the work and write the same numbers as one process."""
    _guard(_evaluate, requests, out, model, params, ppl)


def _evaluate(requests_path, out, model_path, params_path, with_ppl):
    import pandas as pd

    from pipeline import distributed
    from pipeline.config import load_params
    from pipeline.data import me_ppl_texts, verified_path
    from pipeline.evaluation.cache import StateCache
    from pipeline.evaluation.perplexity import perplexity
    from pipeline.evaluation.suite import CONSISTENCY_REFERENCE, EvalSettings, by_protocol, evaluate_state, wikitext_tfidf
    from pipeline.requests import load_requests
    from pipeline.stages.common import write_json
    from pipeline.stages.evaluate import finite

    cfg = load_params(params_path)
    settings = EvalSettings.from_params(cfg["evaluation"])
    reqs = load_requests(requests_path)
    try:
        groups = by_protocol(reqs)
    except ValueError as exc:  # plain requests without a true object: nothing to measure them by
        raise UserError(str(exc)) from None
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} exists and is not empty")
    tfidf = wikitext_tfidf(verified_path("wikitext"))
    texts = me_ppl_texts() if with_ppl else None
    lm = _load_for_rank(model_path or cfg["model"]["path"], cfg)
    cache = StateCache.of(lm.model, lm.fingerprint)
    t0 = time.perf_counter()
    metrics, tables = {}, []
    for protocol, positions in groups.items():
        m, df = evaluate_state(lm.model, lm.tokenizer, [reqs[i] for i in positions], settings.generation, tfidf,
                               cache=cache)
        metrics[protocol] = finite(m)
        tables.append(df.assign(request=[positions[i] for i in df["request"]]))
    doc = {"n_requests": len(reqs), "metrics": metrics, "model": {"path": str(lm.path), "fingerprint": lm.fingerprint},
           "generation": {**settings.generation.describe(), "consistency": CONSISTENCY_REFERENCE},
           "processes": distributed.size(), "seconds": None}
    if texts is not None:
        doc["perplexity"] = {"dataset": "ME-PPL-50", "n_texts": len(texts), "max_length": settings.ppl_max_length,
                             "ppl": perplexity(lm.model, lm.tokenizer, texts, settings.ppl_max_length, cache=cache)}
    doc["seconds"] = time.perf_counter() - t0
    if distributed.is_main():
        table = pd.concat(tables, ignore_index=True)
        table["case_id"] = [None if v is None else str(v) for v in table["case_id"]]  # int (CounterFact) or str
        out.mkdir(parents=True, exist_ok=True)
        table.to_parquet(out / "eval.parquet", index=False)
        write_json(out / "metrics.json", doc)
        typer.echo(json.dumps(metrics) + f"\nwrote {out} (processes: {distributed.size()}, {doc['seconds']:.1f} s)")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
