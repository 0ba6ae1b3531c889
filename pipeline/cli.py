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
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _user_errors():
    """Exception types that are the user's input, not a bug: shown as one line, exit code 2."""
    from pipeline.config import ParamsError
    from pipeline.editing.covariance import CovarianceCacheError
    from pipeline.editing.hparams import HParamsError
    from pipeline.editing.methods import MethodError
    from pipeline.editing.requests import RequestError
    from pipeline.editing.values import OptimisationError
    from pipeline.models.adapters import AdapterError
    from pipeline.models.loading import ModelLoadError

    from pipeline.data import DataError

    return (DataError, ParamsError, HParamsError, MethodError, RequestError, AdapterError, ModelLoadError,
            CovarianceCacheError, OptimisationError, UserError, FileNotFoundError)


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
    method: str = typer.Option(None, "--method", help="pmet | memit | pmet-mlp-only | pmet-attn-write | pmet-even (default: params)"),
    model: str = typer.Option(None, "--model", help="local HF model directory (default: params, else SmolLM2-135M-Instruct)"),
    params: Path = typer.Option(None, "--params", help="params.yaml (default: built-in defaults)"),
    engine: str = typer.Option(None, "--engine", help="fast | reference (default: params)"),
    save_model: bool = typer.Option(False, "--save-model", help="also write the edited HF model to OUT/model"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Edit a batch of facts into the model; write metrics.json, deltas.safetensors and traces."""
    try:
        _edit(requests, out, method, model, params, engine, save_model, progress)
    except _user_errors() as exc:
        _fail(str(exc))


def _edit(requests_path, out, method, model_path, params_path, engine, save_model, progress):
    import torch

    from pipeline.config import load_params
    from pipeline.editing.engine import ENGINES, apply_deltas, default_corpus
    from pipeline.editing.engine import edit as run_edit
    from pipeline.editing.hparams import load_hparams
    from pipeline.editing.methods import get_method
    from pipeline.editing.requests import load_requests
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
    hp = load_hparams(cfg["edit"]["hparams"], spec.hparams_from, cfg["edit"]["overrides"])
    reqs = load_requests(requests_path)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} exists and is not empty")
    corpus = Path(cfg["corpus"]["path"]) if cfg["corpus"]["path"] else default_corpus()

    torch.manual_seed(cfg["seed"])
    lm = load_model(model_path or cfg["model"]["path"], device=cfg["model"]["device"], dtype=cfg["model"]["dtype"])
    t0 = time.perf_counter()
    pre, pre_rows = evaluate(lm.model, lm.tokenizer, reqs)
    t_pre = time.perf_counter() - t0
    result = run_edit(lm.model, lm.tokenizer, reqs, method=method, hparams=hp, engine=engine, corpus=corpus,
                      cache_dir=cfg["cache_dir"], fingerprint=lm.fingerprint, progress=progress)
    apply_deltas(lm.model, result.deltas)
    t0 = time.perf_counter()
    post, post_rows = evaluate(lm.model, lm.tokenizer, reqs)
    t_post = time.perf_counter() - t0
    result.timings.update({"evaluate_pre_s": t_pre, "evaluate_post_s": t_post})
    write_edit_outputs(out, lm, reqs, result, pre, post, pre_rows, post_rows, save_model=save_model)
    summary = "  ".join(f"{k} {pre[k]:.3f}→{post[k]:.3f}" for k in ("efficacy", "generalization", "specificity"))
    typer.echo(f"{method}: {len(reqs)} requests  {summary}\nwrote {out}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
