"""Hyper-parameters: a validated dataclass, loaded from per-model data files.

Per-model settings live in ``pipeline/hparams/<model>.yaml`` (data, not code) with a ``defaults``
section and one section per method; ``params.yaml`` names the file and may override fields.
Every value is range-checked here so that a bad setting fails before any model work.

The *canonical form* (:meth:`HParams.to_dict`) is what a ledger batch records and hashes into its
entry id, so it must not depend on which fields the code happens to have.  Form 1, the only one so
far: the fields of :data:`ALWAYS_WRITTEN` (frozen: what the form held when it was fixed) are always
written; every other field is written only when it differs from its default.  A field added later
therefore never appears in the canonical form of a setting that leaves it at its default, and
adding a field with a default never changes the id of an existing entry.  A field's default may
never change (it would change what an old entry means); and a future form that needs other rules
must mark itself in the dict it writes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml


HPARAMS_DIR = Path(__file__).resolve().parent.parent / "hparams"


COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _rule_label(solver: str) -> str:
    """The update rule's label; the default rule has none, so a table of plain batches never
    imports the rules (torch)."""
    if solver == "closed_form":
        return ""
    from pipeline.editing.solvers import SOLVERS

    return SOLVERS[solver].label if solver in SOLVERS else solver


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
    cov_max_texts: int = 0  # 0 = every text (line) of the corpus
    cov_max_tokens: int = 0  # 0 = every token; else the corpus stream stops after this many (pipeline/corpus.py)
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
    # --- the update rule of every written layer (pipeline/editing/solvers.py) and what it reads
    solver: str = "closed_form"
    norm_weight: float = 0.0  # ENCORE's λₙ: λₙI in the closed form's normal matrix (0 = off)
    null_space_share: float = 0.5  # null_space: share of C's eigenvectors (smallest eigenvalues) P keeps
    null_space_alpha: float = 1.0  # null_space: α of the αI term
    # --- norm control of the targets (any method)
    # ENCORE's most-probable early stopping: a request stops once o* has been the argmax on every
    # rewriting prompt for this many steps in a row (0 = off)
    argmax_stop_steps: int = 0
    # NAS: each optimised target is rescaled to the norm of the unedited model's value at its site
    # for the same prompt; with norm_anchor_skip, a request whose target norm exceeds that many times
    # the anchor is not written (its target is its current value)
    norm_anchor: bool = False
    norm_anchor_skip: float | None = None

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
        for name in ("cov_max_texts", "cov_max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise HParamsError(f"{name} must be an integer ≥ 0 (0 = all), got {v!r}")
        for name in ("v_dtype", "cov_dtype"):
            if getattr(self, name) not in COMPUTE_DTYPES:
                raise HParamsError(f"{name} must be one of {', '.join(COMPUTE_DTYPES)}, got {getattr(self, name)!r}")
        from pipeline.editing.solvers import SOLVERS  # torch: imported when hyper-parameters are checked,
        from pipeline.models.attention import ATTENTION_CHOICES  # not when a table only reads them

        if self.v_attention not in ATTENTION_CHOICES:
            raise HParamsError(f"v_attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.v_attention!r}")
        if self.solver not in SOLVERS:
            raise HParamsError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if not _finite(self.norm_weight) or self.norm_weight < 0:
            raise HParamsError(f"norm_weight must be a finite number ≥ 0, got {self.norm_weight!r}")
        if not _finite(self.null_space_share) or not 0 < self.null_space_share <= 1:
            raise HParamsError(f"null_space_share must be in (0, 1], got {self.null_space_share!r}")
        if not _finite(self.null_space_alpha) or self.null_space_alpha <= 0:
            raise HParamsError(f"null_space_alpha must be a finite number > 0, got {self.null_space_alpha!r}")
        if not isinstance(self.argmax_stop_steps, int) or isinstance(self.argmax_stop_steps, bool) or self.argmax_stop_steps < 0:
            raise HParamsError(f"argmax_stop_steps must be an integer ≥ 0 (0 = off), got {self.argmax_stop_steps!r}")
        if not isinstance(self.norm_anchor, bool):
            raise HParamsError(f"norm_anchor must be true or false, got {self.norm_anchor!r}")
        if self.norm_anchor_skip is not None and (not _finite(self.norm_anchor_skip) or self.norm_anchor_skip <= 1):
            raise HParamsError(f"norm_anchor_skip must be a number > 1 or null, got {self.norm_anchor_skip!r}")
        if self.norm_anchor_skip is not None and not self.norm_anchor:
            raise HParamsError("norm_anchor_skip needs norm_anchor: true")
        self._validate_extensions()

    def region_settings(self, name: str) -> dict[str, Any]:
        """Layers, λ, clamp and weight decay of region ``name`` (a method's region reads the group
        of fields :data:`REGION_FIELDS` names; a λ left at ``None`` is the low region's)."""
        f = REGION_FIELDS[name]
        lam = getattr(self, f.mom2_update_weight)
        return {"layers": getattr(self, f.layers), "mom2_update_weight": self.mom2_update_weight if lam is None else lam,
                "clamp_norm_factor": getattr(self, f.clamp_norm_factor), "weight_decay": getattr(self, f.weight_decay)}

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
        """``'+iterative+na1'`` / ``'+nap2'`` / ``'+ns+nas'`` / ``''``: how ``log`` and the tables name a
        batch's modifiers and norm controls (the update rule's label, e.g. ``ns`` null space, ``jt``
        joint; ``nc`` ENCORE's norm term, ``mpes`` its early stop, ``nas`` norm anchoring)."""
        return self.label_of(vars(self))

    @classmethod
    def label_of(cls, data: dict[str, Any]) -> str:
        """:attr:`modifier_label` of hyper-parameters as a dict (absent fields at their defaults),
        without building and validating them: tables of many batches only read them."""
        defaults = {f.name: f.default for f in fields(cls)}

        def get(name: str) -> Any:
            return data.get(name, defaults[name])

        label = "+iterative" if get("iterative") else ""
        if get("neighbors"):
            label += f"+{'nap' if get('neighbor_prefixes') else 'na'}{get('neighbors')}"
        rule = _rule_label(get("solver"))
        for on, name in ((bool(rule), rule), (get("norm_weight") > 0, "nc"),
                         (get("argmax_stop_steps") > 0, "mpes"), (get("norm_anchor"), "nas")):
            label += f"+{name}" if on else ""
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
        """The canonical form (see the module docstring): plain JSON-able values, the fields of
        :data:`ALWAYS_WRITTEN`, and every other field that is not at its default."""
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        for f in fields(self):
            if f.name not in ALWAYS_WRITTEN and d[f.name] == _plain(f.default):
                del d[f.name]
        return d

    def replace(self, **changes) -> HParams:
        return HParams.from_dict({**self.to_dict(), **changes})


# Canonical form 1: the fields always written.  Frozen — a new field is never added here (it is
# written only when not at its default); tests/test_requests_hparams.py pins the form.
ALWAYS_WRITTEN = ("layers", "mom2_update_weight", "clamp_norm_factor", "v_num_grad_steps", "v_batch_requests", "v_lr",
                  "v_weight_decay", "kl_factor", "nll_weight", "nll_weight_after_argmax", "kl_stop", "loss_stop",
                  "context_starters", "context_length", "context_seed", "cov_max_texts", "cov_max_length",
                  "cov_batch_tokens", "v_dtype", "cov_dtype", "v_attention", "v_workers")


@dataclass(frozen=True)
class RegionFields:
    """The names of the fields that set one region of a method (:mod:`pipeline.editing.methods`)."""

    layers: str
    mom2_update_weight: str
    clamp_norm_factor: str
    weight_decay: str


REGION_FIELDS = {
    "low": RegionFields("layers", "mom2_update_weight", "clamp_norm_factor", "v_weight_decay"),
    # JEEP's high region (probability promotion): γ*, β* and its own λ (None: the low region's)
    "high": RegionFields("high_layers", "high_mom2_update_weight", "high_clamp_norm_factor", "high_v_weight_decay"),
}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


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
