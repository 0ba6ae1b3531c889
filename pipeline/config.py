"""``params.yaml``: load, fill defaults, validate (before any model is loaded)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "model": {"path": None, "device": "cpu", "dtype": "float32"},
    "corpus": {"path": None},
    "edit": {"method": "pmet", "hparams": "smollm2-135m-instruct", "overrides": {}, "engine": "fast"},
    "cache_dir": None,
    "seed": 0,
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
    return params
