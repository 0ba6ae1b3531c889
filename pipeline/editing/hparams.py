"""Hyper-parameters: a validated dataclass, loaded from per-model data files.

Per-model settings live in ``pipeline/hparams/<model>.yaml`` (data, not code) with a ``defaults``
section and one section per method; ``params.yaml`` names the file and may override fields.
Every value is range-checked here so that a bad setting fails before any model work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

HPARAMS_DIR = Path(__file__).resolve().parent.parent / "hparams"


COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")


class HParamsError(ValueError):
    """A hyper-parameter is missing, unknown or out of range."""


@dataclass(frozen=True)
class HParams:
    layers: tuple[int, ...]
    mom2_update_weight: float = 15000.0  # λ: weight of the preserved-key covariance
    clamp_norm_factor: float = 0.75  # ‖δ‖ ≤ factor · ‖h_init‖ per site
    v_num_grad_steps: int = 25
    v_batch_requests: int = 25  # requests per forward/backward chunk (memory bound; same result)
    v_lr: float = 0.5
    v_weight_decay: float = 0.5  # coefficient of ‖δ‖ / ‖h_init‖²
    kl_factor: float = 0.0625
    nll_weight: float = 1.0  # φ
    # PMET's rule: once o* is the argmax on every rewriting prompt the NLL weight drops to this
    # value (ψ) and the request stops when KL ≤ kl_stop.  ``None`` keeps MEMIT's rule only.
    nll_weight_after_argmax: float | None = None
    kl_stop: float = 0.01
    loss_stop: float = 0.05  # MEMIT's rule: stop a request when its loss falls below this
    context_starters: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    context_length: int = 10  # generated tokens per context prefix
    context_seed: int = 0
    cov_max_texts: int = 0  # 0 = every line of the corpus
    cov_max_length: int = 256
    cov_batch_tokens: int = 8192
    # Compute dtypes of the two heavy loops, independent of the model's storage dtype.  On CPUs
    # with bfloat16 dot products (AVX512-BF16, AMX) and on GPUs a bfloat16 matmul is several
    # times faster than float32; keys, current values and the closed-form spread always use the
    # model itself, so only the optimisation of δ and the covariance statistics are affected.
    v_dtype: str = "float32"
    cov_dtype: str = "float32"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        layers = self.layers
        if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise HParamsError(f"layers must be a non-empty list of integers, got {layers!r}")
        if list(layers) != sorted(set(layers)):
            raise HParamsError(f"layers must be strictly increasing, got {list(layers)}")
        if min(layers) < 0:
            raise HParamsError(f"layers must be ≥ 0, got {list(layers)}")
        positive = ("mom2_update_weight", "clamp_norm_factor", "v_lr", "kl_stop", "loss_stop", "nll_weight")
        for name in positive:
            v = getattr(self, name)
            if not _finite(v) or v <= 0:
                raise HParamsError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("v_weight_decay", "kl_factor"):
            v = getattr(self, name)
            if not _finite(v) or v < 0:
                raise HParamsError(f"{name} must be a finite number ≥ 0, got {v!r}")
        if self.nll_weight_after_argmax is not None and (not _finite(self.nll_weight_after_argmax) or self.nll_weight_after_argmax <= 0):
            raise HParamsError(f"nll_weight_after_argmax must be > 0 or null, got {self.nll_weight_after_argmax!r}")
        for name in ("v_num_grad_steps", "v_batch_requests", "context_length", "cov_max_length", "cov_batch_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise HParamsError(f"{name} must be an integer ≥ 1, got {v!r}")
        if self.cov_max_length < 8:
            raise HParamsError(f"cov_max_length must be ≥ 8 tokens, got {self.cov_max_length}")
        if not isinstance(self.cov_max_texts, int) or isinstance(self.cov_max_texts, bool) or self.cov_max_texts < 0:
            raise HParamsError(f"cov_max_texts must be an integer ≥ 0 (0 = all), got {self.cov_max_texts!r}")

        for name in ("v_dtype", "cov_dtype"):
            if getattr(self, name) not in COMPUTE_DTYPES:
                raise HParamsError(f"{name} must be one of {', '.join(COMPUTE_DTYPES)}, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HParamsError(f"unknown hyper-parameter(s): {', '.join(unknown)}")
        if "layers" not in data:
            raise HParamsError("hyper-parameters need 'layers'")
        data = dict(data)
        for key in ("layers", "context_starters"):
            if key in data and isinstance(data[key], list):
                data[key] = tuple(data[key])
        try:
            return cls(**data)
        except TypeError as exc:
            raise HParamsError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["context_starters"] = list(self.context_starters)
        return d

    def replace(self, **changes) -> HParams:
        return HParams.from_dict({**self.to_dict(), **changes})


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def hparams_file(name_or_path: str | Path) -> Path:
    """A bundled name (``smollm2-135m-instruct``) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise HParamsError(f"hyper-parameter file {p} does not exist")
        return p
    bundled = HPARAMS_DIR / f"{name_or_path}.yaml"
    if not bundled.exists():
        names = ", ".join(sorted(q.stem for q in HPARAMS_DIR.glob("*.yaml")))
        raise HParamsError(f"no bundled hyper-parameters named {name_or_path!r}; bundled: {names}")
    return bundled


def load_hparams(name_or_path: str | Path, section: str, overrides: dict[str, Any] | None = None) -> HParams:
    """Merge ``defaults`` + the method's section + ``overrides`` from a hyper-parameter file."""
    path = hparams_file(name_or_path)
    doc = yaml.safe_load(path.read_text()) or {}
    methods = doc.get("methods", {})
    if section not in methods:
        raise HParamsError(f"{path} has no section for method {section!r} (has: {', '.join(methods)})")
    merged = {**doc.get("defaults", {}), **(methods[section] or {}), **(overrides or {})}
    return HParams.from_dict(merged)
