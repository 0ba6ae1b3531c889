"""``params.yaml``: load, fill defaults, validate (before any model is loaded)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "model": {"path": None, "device": "cpu", "dtype": "float32"},
    "corpus": {"path": None},
    "edit": {"method": "pmet", "hparams": "smollm2-135m-instruct", "overrides": {}, "engine": "fast"},
    # the DVC pipeline: one covariance stage per (role, layer); batches may only edit these
    "covariance": {"layers": [1, 2, 3, 4, 5], "roles": ["mlp_out"]},
    "cache_dir": None,
    "seed": 0,
    # the apply stage's collapse guard: refuse a batch whose ME-PPL-50 perplexity exceeds this many
    # times the base model's (recorded as a refused entry; docs/LEDGER.md); null = off
    "guard": {"max_ppl_ratio": None},
}


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
    cov = params["covariance"]
    if not isinstance(cov["layers"], list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                      for x in cov["layers"]):
        raise ParamsError("covariance.layers must be a list of layer indices (integers ≥ 0)")
    if not isinstance(cov["roles"], list) or not all(r in ("mlp_out", "attn_out") for r in cov["roles"]):
        raise ParamsError("covariance.roles must be a list of mlp_out / attn_out")
    ratio = params["guard"]["max_ppl_ratio"]
    if ratio is not None and (not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio)
                              or ratio <= 0):
        raise ParamsError(f"guard.max_ppl_ratio must be a finite number > 0 or null (off), got {ratio!r}")
    return params
