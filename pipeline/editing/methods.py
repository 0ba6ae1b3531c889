"""Editing methods as data: each is a list of regions over one shared engine.

A *region* is one place where target vectors are optimised and the layers written from them: a
token position (the subject's last token, or JEEP's prediction token = the last prompt token), the
value spaces optimised there at the region's last layer (its *sites*), which output projections
are written from which site's targets, and how the residual is divided over the region's layers.
Its layers, λ, clamp and weight decay come from the hyper-parameters: each region names the group
of fields it reads (:data:`pipeline.editing.hparams.REGION_FIELDS`), so JEEP's high region has its
own settings.  PMET and MEMIT have one region; JEEP has two (low: information enrichment at the
subject, high: probability promotion at the prediction token).

Site names are what ``keys_values.parquet`` and the traces record: ``residual`` / ``attn`` /
``mlp`` (the block output h, the attention output projection's output a, the MLP output
projection's output m) at the subject, ``pred_`` + the same at the prediction token.

A method optimises all its regions' sites together (``joint``: JEEP's synergistic optimisation) or
one region after the other on the weights the previous region wrote (JEEP's "separate
optimisation" ablation).  Adding a method is adding an entry to :data:`METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.editing.hparams import REGION_FIELDS, HParamsError

# which module's output a site is (the space its closed-form update is exact in)
SITE_ROLES = {"residual": "block", "attn": "attn_out", "mlp": "mlp_out",
              "pred_residual": "block", "pred_attn": "attn_out", "pred_mlp": "mlp_out"}
POSITION_SITES = {"subject": ("residual", "attn", "mlp"), "prediction": ("pred_residual", "pred_attn", "pred_mlp")}
WRITABLE_ROLES = ("mlp_out", "attn_out")
SPREADS = ("even", "sqrt")


def site_position(site: str) -> str:
    """The token position a site name belongs to (``subject`` or ``prediction``)."""
    return next(pos for pos, names in POSITION_SITES.items() if site in names)


class MethodError(ValueError):
    """Unknown method name or inconsistent method spec."""


@dataclass(frozen=True)
class RegionSpec:
    """What a method does in one region; :class:`Region` adds the settings of one edit."""

    name: str  # the hyper-parameter group it reads (REGION_FIELDS): "low" | "high"
    position: str  # "subject" | "prediction": where δ is added and keys are read
    sites: tuple[str, ...]  # optimised at the region's last layer
    writes: tuple[tuple[str, str], ...]  # (role written, site whose targets it is written from)
    spread: str  # how the residual is divided over the region's layers


@dataclass(frozen=True)
class Region(RegionSpec):
    """A region with the settings of one edit."""

    layers: tuple[int, ...]
    mom2_update_weight: float  # λ of the covariance term of its spread
    clamp_norm_factor: float  # ‖δ‖ ≤ factor · ‖value before δ‖ at its sites
    weight_decay: float  # coefficient of ‖δ‖ / ‖value before δ‖² in the value loss

    @property
    def last_layer(self) -> int:
        return self.layers[-1]


@dataclass(frozen=True)
class Site:
    """One optimised vector of a request: a site of a region, at the region's last layer."""

    name: str
    region: Region

    @property
    def layer(self) -> int:
        return self.region.last_layer

    @property
    def role(self) -> str:
        return SITE_ROLES[self.name]


def sites_of(regions: tuple[Region, ...]) -> tuple[Site, ...]:
    return tuple(Site(name, r) for r in regions for name in r.sites)


@dataclass(frozen=True)
class Method:
    name: str
    regions: tuple[RegionSpec, ...]
    hparams_from: str  # which hyper-parameter section it uses (ablations share their method's)
    description: str
    joint: bool = True  # optimise every region's sites together (False: one region after the other)
    # region names whose clamps must strictly decrease (JEEP: γ' > γ*), checked when all are present
    clamp_order: tuple[str, ...] = ()

    def __post_init__(self):
        names = [r.name for r in self.regions]
        if not self.regions or len(set(names)) != len(names):
            raise MethodError(f"{self.name}: regions must be non-empty and have distinct names, got {names}")
        sites = [s for r in self.regions for s in r.sites]
        if not sites or len(set(sites)) != len(sites):
            raise MethodError(f"{self.name}: sites must be distinct and non-empty, got {sites}")
        for r in self.regions:
            if r.position not in POSITION_SITES:
                raise MethodError(f"{self.name}: unknown position {r.position!r}")
            if not set(r.sites) <= set(POSITION_SITES[r.position]):
                raise MethodError(f"{self.name}: region {r.name} at the {r.position} token cannot optimise {r.sites}")
            if r.spread not in SPREADS:
                raise MethodError(f"{self.name}: unknown spread {r.spread!r}")
            for role, site in r.writes:
                if site not in r.sites or role not in WRITABLE_ROLES:
                    raise MethodError(f"{self.name}: region {r.name} cannot write {role} from site {site!r}")
        if not any(r.writes for r in self.regions):
            raise MethodError(f"{self.name}: writes nothing")
        if not self.joint and not all(r.writes for r in self.regions):
            raise MethodError(f"{self.name}: separate optimisation needs writes in every region")

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(s for r in self.regions for s in r.sites)

    def resolve(self, hp) -> tuple[Region, ...]:
        """The regions with ``hp``'s settings (:meth:`pipeline.editing.hparams.HParams.region_settings`)."""
        return tuple(Region(**vars(r), **hp.region_settings(r.name)) for r in self.regions)

    def check(self, hp) -> None:
        """What the method needs from ``hp`` beyond each field's own range (HParamsError)."""
        regions = {r.name: r for r in self.resolve(hp)}
        for r in regions.values():
            if not r.layers:
                raise HParamsError(f"method {self.name} needs {REGION_FIELDS[r.name].layers} (its {r.name} region)")
        if set(self.clamp_order) <= set(regions):
            for a, b in zip(self.clamp_order, self.clamp_order[1:]):
                ca, cb = regions[a].clamp_norm_factor, regions[b].clamp_norm_factor
                if not ca > cb:
                    raise HParamsError(f"method {self.name}: clamps must decrease from region to region (JEEP: "
                                       f"γ' > γ*), but {REGION_FIELDS[a].clamp_norm_factor} {ca} ≤ "
                                       f"{REGION_FIELDS[b].clamp_norm_factor} {cb}")


def _low(sites, writes, spread="sqrt"):
    return RegionSpec("low", "subject", sites, writes, spread)


# JEEP: δ' on the MLP output m^{L'} at the subject's last token (as the public code; PMET's value
# space, where the square-root spread of step 2 applies), δ* on the residual stream h^{L*} at the
# prediction token (as the paper; MEMIT's value space, where the even spread of step 3 is derived).
_JEEP_LOW = _low(("mlp",), (("mlp_out", "mlp"),))
_JEEP_HIGH = RegionSpec("high", "prediction", ("pred_residual",), (("mlp_out", "pred_residual"),), "even")


def _jeep(name: str, description: str, low: RegionSpec | None = _JEEP_LOW, high: RegionSpec | None = _JEEP_HIGH,
          joint: bool = True) -> Method:
    regions = tuple(r for r in (low, high) if r is not None)
    return Method(name, regions, "jeep", description, joint, clamp_order=("low", "high"))


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("memit", (_low(("residual",), (("mlp_out", "residual"),), "even"),), "memit",
               "MEMIT: residual-stream target at the last critical layer, even spread"),
        Method("pmet", (_low(("attn", "mlp"), (("mlp_out", "mlp"),)),), "pmet",
               "PMET: joint attention+MLP targets, MLP target written, square-root spread"),
        Method("pmet-mlp-only", (_low(("mlp",), (("mlp_out", "mlp"),)),), "pmet",
               "PMET ablation 'w/o δ^a': only the MLP target is optimised"),
        Method("pmet-attn-write", (_low(("attn", "mlp"), (("attn_out", "attn"), ("mlp_out", "mlp"))),), "pmet",
               "PMET ablation 'w/ W_O': the attention output projection is written too"),
        Method("pmet-even", (_low(("attn", "mlp"), (("mlp_out", "mlp"),), "even"),), "pmet",
               "PMET ablation 'even spread'"),
        _jeep("jeep", "JEEP: joint low (subject, m^L') + high (prediction, h^L*) targets; sqrt spread low, even "
                      "spread high"),
        _jeep("jeep-low-only", "JEEP ablation 'w/o δ* & Step3': only the low region is optimised and written",
              high=None),
        _jeep("jeep-high-only", "JEEP ablation 'w/o δ' & Step2': only the high region is optimised and written",
              low=None),
        _jeep("jeep-no-step3", "JEEP ablation 'w/o Step3': both targets optimised together, only the low region "
                               "written", high=RegionSpec("high", "prediction", ("pred_residual",), (), "even")),
        _jeep("jeep-no-step2", "JEEP ablation 'w/o Step2': both targets optimised together, only the high region "
                               "written", low=_low(("mlp",), ())),
        _jeep("jeep-separate", "JEEP ablation 'separate optimisation': δ' optimised and written, then δ* on the "
                               "updated model", joint=False),
        _jeep("jeep-even", "JEEP ablation 'even spread in Step2'", low=_low(("mlp",), (("mlp_out", "mlp"),), "even")),
        _jeep("jeep-attn-high", "JEEP ablation 'w/ MHSA in Step3': the high region writes attention output projections",
              high=RegionSpec("high", "prediction", ("pred_residual",), (("attn_out", "pred_residual"),), "even")),
    ]
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
