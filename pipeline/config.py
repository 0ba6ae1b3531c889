"""``params.yaml``: load, fill defaults, validate (before any model is loaded)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "model": {"path": None, "device": "cpu", "dtype": "float32"},
    # the covariance corpus (pipeline/corpus.py): null = the bundled WikiText-2 sample; else a text, Parquet,
    # JSON Lines or CSV file, a directory of them, a saved `datasets` directory, or hub:NAME
    "corpus": {"path": None, "text_column": "text", "split": None, "config": None},
    # iterative / neighbors: the two modifiers (any method); recorded as hyper-parameters
    "edit": {"method": "pmet", "hparams": "smollm2-135m-instruct", "overrides": {}, "engine": "fast",
             "iterative": False, "neighbors": 0},
    # the DVC pipeline: one covariance stage per (role, layer); batches may only edit these
    "covariance": {"layers": [1, 2, 3, 4, 5], "roles": ["mlp_out"]},
    "cache_dir": None,
    # the covariance and evaluate stages run in this many local processes (torchrun; gloo on CPU, NCCL on
    # GPU, one GPU each).  Not a dependency of any stage: the results are the same (pipeline/distributed.py)
    "distributed": {"processes": 1},
    "seed": 0,
    # the probes' DVC stages (probes/dvc.yaml): CounterFact records start .. start+n
    "probes": {"start": 0, "n": 100},
    # the evaluate stage of every batch (see pipeline/evaluation/suite.py); not part of any entry id
    "evaluation": {
        "generation": {"prompts_per_record": 2, "max_new_tokens": 40, "top_k": 5, "batch_size": 32},
        "retention": {"sample": 100, "full_every": 10, "generation": True},
        "perplexity": {"max_length": 256},
        "seed": 0,
    },
    # the apply stage's collapse guard: refuse a batch whose ME-PPL-50 perplexity exceeds this many
    # times the base model's (recorded as a refused entry; docs/LEDGER.md); null = off.  On by default:
    # a healthy constrained history stays within 1.3× (benchmarks/RESULTS.md §5), a collapsing one
    # passes 2× early
    "guard": {"max_ppl_ratio": 2.0},
    # the optional `export` stage (dvc.yaml): the state after `entry` in each of `formats`; [] = off
    "export": {"formats": [], "entry": "head", "gguf_dtype": "f32", "peft_rtol": None},
    # `editledger add` appends a checkpoint first once this many batches follow the last one (and all
    # are computed): readers and DVC then start there, so their cost stays flat (docs/LEDGER.md); null = never
    "ledger": {"checkpoint_every": 20},
}

EXPORT_FORMATS = ("peft", "gguf")  # `editledger export --format`, `export.formats`
GGUF_DTYPES = ("f32", "f16")


class ParamsError(ValueError):
    """params.yaml is unreadable or has an unknown/ill-typed entry."""


def _merge(base: dict, over: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k not in base:
            raise ParamsError(f"unknown parameter {where}{k!r}; known: {', '.join(base)}")
        if isinstance(base[k], dict) and k != "overrides":
            if not isinstance(v, dict):
                raise ParamsError(f"{where}{k} must be a mapping")
            out[k] = _merge(base[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


def load_params(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return copy.deepcopy(DEFAULTS)
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except OSError as exc:
        raise ParamsError(f"cannot read {p}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ParamsError(f"{p} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ParamsError(f"{p} must hold a mapping")
    params = _merge(DEFAULTS, doc, "")
    if not isinstance(params["edit"]["overrides"], dict):
        raise ParamsError("edit.overrides must be a mapping")
    if not isinstance(params["edit"]["iterative"], bool):
        raise ParamsError(f"edit.iterative must be true or false, got {params['edit']['iterative']!r}")
    nb = params["edit"]["neighbors"]
    if not isinstance(nb, int) or isinstance(nb, bool) or nb < 0:
        raise ParamsError(f"edit.neighbors must be an integer ≥ 0, got {nb!r}")
    cov = params["covariance"]
    if not isinstance(cov["layers"], list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                      for x in cov["layers"]):
        raise ParamsError("covariance.layers must be a list of layer indices (integers ≥ 0)")
    if not isinstance(cov["roles"], list) or not all(r in ("mlp_out", "attn_out") for r in cov["roles"]):
        raise ParamsError("covariance.roles must be a list of mlp_out / attn_out")
    _check_corpus(params["corpus"])
    procs = params["distributed"]["processes"]
    if not isinstance(procs, int) or isinstance(procs, bool) or procs < 1:
        raise ParamsError(f"distributed.processes must be an integer ≥ 1, got {procs!r}")
    _check_evaluation(params["evaluation"])
    ratio = params["guard"]["max_ppl_ratio"]
    if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio)
                              or ratio <= 0):
        raise ParamsError(f"guard.max_ppl_ratio must be a finite number > 0 or null (off), got {ratio!r}")
    _check_export(params["export"])
    every = params["ledger"]["checkpoint_every"]
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise ParamsError(f"ledger.checkpoint_every must be an integer ≥ 1 or null (never), got {every!r}")
    return params


def modifier_overrides(cfg: dict[str, Any], iterative: bool | None = None, neighbors: int | None = None) -> dict[str, Any]:
    """``edit.overrides`` plus the modifiers (command-line values win over params.yaml); the
    result is validated with the rest of the hyper-parameters (``HParams``)."""
    out = dict(cfg["edit"]["overrides"])
    it = cfg["edit"]["iterative"] if iterative is None else iterative
    nb = cfg["edit"]["neighbors"] if neighbors is None else neighbors
    if it:
        out["iterative"] = True
    if nb != 0:
        out["neighbors"] = nb
    return out


def _check_corpus(corpus: dict) -> None:
    if not isinstance(corpus["text_column"], str) or not corpus["text_column"]:
        raise ParamsError(f"corpus.text_column must be a column name, got {corpus['text_column']!r}")
    for k in ("path", "split", "config"):
        if corpus[k] is not None and (not isinstance(corpus[k], str) or not corpus[k]):
            raise ParamsError(f"corpus.{k} must be a non-empty string or null, got {corpus[k]!r}")


def _check_evaluation(ev: dict) -> None:
    """Bounds on the evaluation's cost settings: they are the only thing keeping it affordable."""
    def positive_int(where: str, v: Any, allow_none: bool = False, minimum: int = 1) -> None:
        if v is None and allow_none:
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            raise ParamsError(f"evaluation.{where} must be an integer ≥ {minimum}" + (" or null" if allow_none else ""))

    for k in ("prompts_per_record", "max_new_tokens", "top_k", "batch_size"):
        positive_int(f"generation.{k}", ev["generation"][k])
    positive_int("retention.sample", ev["retention"]["sample"], allow_none=True, minimum=0)
    positive_int("retention.full_every", ev["retention"]["full_every"], minimum=0)
    if not isinstance(ev["retention"]["generation"], bool):
        raise ParamsError("evaluation.retention.generation must be true or false")
    positive_int("perplexity.max_length", ev["perplexity"]["max_length"], minimum=2)
    positive_int("seed", ev["seed"], minimum=0)


def _check_export(ex: dict) -> None:
    formats = ex["formats"]
    if not isinstance(formats, list) or len(set(map(str, formats))) != len(formats) or \
            not all(f in EXPORT_FORMATS for f in formats):
        raise ParamsError(f"export.formats must be a list of distinct formats out of {', '.join(EXPORT_FORMATS)} "
                          f"([] = no export stage), got {formats!r}")
    if not isinstance(ex["entry"], (str, int)) or isinstance(ex["entry"], bool):
        raise ParamsError(f"export.entry must be an entry reference or head, got {ex['entry']!r}")
    if ex["gguf_dtype"] not in GGUF_DTYPES:
        raise ParamsError(f"export.gguf_dtype must be one of {', '.join(GGUF_DTYPES)}, got {ex['gguf_dtype']!r}")
    rtol = ex["peft_rtol"]
    if rtol is not None and (not isinstance(rtol, float) or not math.isfinite(rtol) or not 0 < rtol < 1):
        hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if isinstance(rtol, str) else ""
        raise ParamsError(f"export.peft_rtol must be a number in (0, 1) or null (the default tolerance), got "
                          f"{rtol!r}{hint}")
