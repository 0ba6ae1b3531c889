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

from pipeline.models.attention import ATTENTION_CHOICES

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
    v_batch_requests: int = 25  # requests per forward/backward chunk: bounds memory; larger is faster, same optimisation
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
    # Attention kernel of value optimisation (pipeline/models/attention.py): "model" keeps the
    # model's own (what entries recorded before this field ran with), "eager" is 1.8× faster per
    # step on CPU for the short suffixes the fast engine runs.
    v_attention: str = "model"
    # Processes that optimise disjoint slices of a batch's requests, each single-threaded
    # (pipeline/editing/workers.py); 0 = one per torch thread.  CPU only: on a GPU the batch runs in
    # one process.  Requests never interact, so this is the same optimisation up to rounding.
    v_workers: int = 1
    # --- JEEP's high region (probability promotion): layers written from the prediction-token
    # target, its clamp γ* and weight decay β*, and the λ of its covariance term.  The low region
    # uses the fields above (layers, clamp_norm_factor = γ', v_weight_decay = β', kl_factor = α').
    high_layers: tuple[int, ...] = ()
    high_clamp_norm_factor: float = 0.25
    high_v_weight_decay: float = 0.5
    high_mom2_update_weight: float | None = None  # None: mom2_update_weight
    # --- modifiers (any method): iterative editing and neighbour-assisted editing
    iterative: bool = False  # repeat optimise + spread on the current weights until |Δp| ≤ ε
    max_iterations: int = 10
    iteration_epsilon: float = 1.0  # ε on the target perplexity difference
    neighbors: int = 0  # neighbour prompts per request in the value loss (0 = off)
    neighbor_prefixes: bool = False  # NAP: the neighbour prompts get the context prefixes too
    neighbor_weight: float = 1.0  # weight of the neighbour NLL term

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
        if not isinstance(self.v_workers, int) or isinstance(self.v_workers, bool) or not 0 <= self.v_workers <= 256:
            raise HParamsError(f"v_workers must be an integer in 0..256 (0 = one per torch thread), got {self.v_workers!r}")
        if self.cov_max_length < 8:
            raise HParamsError(f"cov_max_length must be ≥ 8 tokens, got {self.cov_max_length}")
        if not isinstance(self.cov_max_texts, int) or isinstance(self.cov_max_texts, bool) or self.cov_max_texts < 0:
            raise HParamsError(f"cov_max_texts must be an integer ≥ 0 (0 = all), got {self.cov_max_texts!r}")
        for name in ("v_dtype", "cov_dtype"):
            if getattr(self, name) not in COMPUTE_DTYPES:
                raise HParamsError(f"{name} must be one of {', '.join(COMPUTE_DTYPES)}, got {getattr(self, name)!r}")
        if self.v_attention not in ATTENTION_CHOICES:
            raise HParamsError(f"v_attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.v_attention!r}")
        self._validate_extensions()

    def _validate_extensions(self) -> None:
        """JEEP's high region and the iterative / neighbour-assisted modifiers."""
        high = self.high_layers
        if not isinstance(high, tuple) or not all(isinstance(x, int) and not isinstance(x, bool) for x in high):
            raise HParamsError(f"high_layers must be a list of integers, got {high!r}")
        if list(high) != sorted(set(high)) or (high and min(high) < 0):
            raise HParamsError(f"high_layers must be strictly increasing layer indices ≥ 0, got {list(high)}")
        if high and min(high) <= max(self.layers):
            raise HParamsError(f"high_layers {list(high)} must lie above the low region's layers {list(self.layers)}")
        for name in ("high_clamp_norm_factor", "iteration_epsilon", "neighbor_weight"):
            v = getattr(self, name)
            if not _finite(v) or v <= 0:
                raise HParamsError(f"{name} must be a finite number > 0, got {v!r}")
        if not _finite(self.high_v_weight_decay) or self.high_v_weight_decay < 0:
            raise HParamsError(f"high_v_weight_decay must be a finite number ≥ 0, got {self.high_v_weight_decay!r}")
        if self.high_mom2_update_weight is not None and (not _finite(self.high_mom2_update_weight)
                                                         or self.high_mom2_update_weight <= 0):
            raise HParamsError(f"high_mom2_update_weight must be > 0 or null, got {self.high_mom2_update_weight!r}")
        for name in ("iterative", "neighbor_prefixes"):
            if not isinstance(getattr(self, name), bool):
                raise HParamsError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.max_iterations, int) or isinstance(self.max_iterations, bool) or not 1 <= self.max_iterations <= 100:
            raise HParamsError(f"max_iterations must be an integer in 1..100, got {self.max_iterations!r}")
        if not isinstance(self.neighbors, int) or isinstance(self.neighbors, bool) or not 0 <= self.neighbors <= 10:
            raise HParamsError(f"neighbors must be an integer in 0..10 (CounterFact has 10 per record), got {self.neighbors!r}")

    @property
    def modifiers(self) -> dict[str, Any]:
        """The switched-on modifiers, for display (they are ordinary, hashed hyper-parameters)."""
        out: dict[str, Any] = {}
        if self.iterative:
            out["iterative"] = {"max_iterations": self.max_iterations, "epsilon": self.iteration_epsilon}
        if self.neighbors:
            out["neighbors"] = {"n": self.neighbors, "prefixes": self.neighbor_prefixes, "weight": self.neighbor_weight}
        return out

    @property
    def modifier_label(self) -> str:
        """``'+iterative+na1'`` / ``'+nap2'`` / ``''``: how ``log`` and the tables name a batch's modifiers."""
        label = "+iterative" if self.iterative else ""
        if self.neighbors:
            label += f"+{'nap' if self.neighbor_prefixes else 'na'}{self.neighbors}"
        return label

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HParamsError(f"unknown hyper-parameter(s): {', '.join(unknown)}")
        if "layers" not in data:
            raise HParamsError("hyper-parameters need 'layers'")
        data = dict(data)
        for key in ("layers", "context_starters", "high_layers"):
            if key in data and isinstance(data[key], list):
                data[key] = tuple(data[key])
        try:
            return cls(**data)
        except TypeError as exc:
            raise HParamsError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; the extension fields are left out while at their defaults, so batches of
        methods and settings that existed before them keep their content hashes (and directory
        names).  Any switched-on modifier or JEEP setting is present, hence hashed."""
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["context_starters"] = list(self.context_starters)
        d["high_layers"] = list(self.high_layers)
        for f in fields(self):
            if f.name in _EXTENSIONS and d[f.name] == (list(f.default) if isinstance(f.default, tuple) else f.default):
                del d[f.name]
        return d

    def replace(self, **changes) -> HParams:
        return HParams.from_dict({**self.to_dict(), **changes})


_EXTENSIONS = ("high_layers", "high_clamp_norm_factor", "high_v_weight_decay", "high_mom2_update_weight", "iterative",
               "max_iterations", "iteration_epsilon", "neighbors", "neighbor_prefixes", "neighbor_weight")


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
