"""Editing methods as small declarative specs over one shared engine.

A method says *where* the target vectors are optimised (``sites``), *which* projections are
written from which site's targets (``writes``), and how the residual is divided over the critical
layers (``spread``).  PMET, MEMIT, JEEP and their ablations differ only here.

Sites come in two positions.  *Subject* sites (``residual``, ``attn``, ``mlp``) sit at the
subject's last token of the last layer of ``hp.layers`` (the low region); *prediction* sites
(``pred_residual``, ``pred_attn``, ``pred_mlp``) sit at the last prompt token of the last layer of
``hp.high_layers`` (JEEP's high region, "probability promotion").  A method optimises its sites of
both regions either together (JEEP's synergistic optimisation) or one region after the other
(``joint=False``: optimise low → spread low → optimise high → spread high), and then spreads the
low region's writes over ``hp.layers`` and the high region's over ``hp.high_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass

SUBJECT_SITES = ("residual", "attn", "mlp")
PREDICTION_SITES = ("pred_residual", "pred_attn", "pred_mlp")
SITES = SUBJECT_SITES  # at the subject's last token (the classic sites)
ALL_SITES = SUBJECT_SITES + PREDICTION_SITES
# Which module's output each site is: the block output h^L, the attention output projection's
# output a^L, the MLP output projection's output m^L (the space its closed-form update is exact in).
SITE_ROLES = {"residual": "block", "attn": "attn_out", "mlp": "mlp_out",
              "pred_residual": "block", "pred_attn": "attn_out", "pred_mlp": "mlp_out"}
SPREADS = ("even", "sqrt")
REGIONS = ("low", "high")


def site_position(site: str) -> str:
    """``'subject'`` (subject's last token, low region) or ``'prediction'`` (last prompt token, high region)."""
    return "prediction" if site in PREDICTION_SITES else "subject"


def site_region(site: str) -> str:
    return "high" if site in PREDICTION_SITES else "low"


class MethodError(ValueError):
    """Unknown method name or inconsistent method spec."""


@dataclass(frozen=True)
class Method:
    name: str
    sites: tuple[str, ...]  # optimised sites, both regions
    writes: tuple[tuple[str, str], ...]  # low region: (role written: "mlp_out" | "attn_out", site giving its targets)
    spread: str  # low region's spread
    hparams_from: str  # which hyper-parameter section it uses (ablations share their method's)
    description: str
    high_writes: tuple[tuple[str, str], ...] = ()  # high region (over hp.high_layers), keys at the prediction token
    high_spread: str = "even"
    joint: bool = True  # optimise both regions' vectors together (False: low region first, then high)

    def __post_init__(self):
        if not set(self.sites) <= set(ALL_SITES):
            raise MethodError(f"{self.name}: unknown site in {self.sites}")
        if len(set(self.sites)) != len(self.sites) or not self.sites:
            raise MethodError(f"{self.name}: sites must be distinct and non-empty, got {self.sites}")
        for spread in (self.spread, self.high_spread):
            if spread not in SPREADS:
                raise MethodError(f"{self.name}: unknown spread {spread!r}")
        if not (self.writes or self.high_writes):
            raise MethodError(f"{self.name}: writes nothing")
        for writes, region in ((self.writes, "low"), (self.high_writes, "high")):
            for role, site in writes:
                if site not in self.sites:
                    raise MethodError(f"{self.name}: writes from site {site!r} that is not optimised")
                if site_region(site) != region or role not in ("mlp_out", "attn_out"):
                    raise MethodError(f"{self.name}: {region} region cannot write {role} from site {site!r}")
        if not self.joint and not (self.writes and self.high_writes):
            raise MethodError(f"{self.name}: separate optimisation needs writes in both regions")

    @property
    def two_region(self) -> bool:
        """Does the method use ``hp.high_layers`` (a prediction-token site or high writes)?"""
        return bool(self.high_writes) or any(site_region(s) == "high" for s in self.sites)

    def region_sites(self, region: str) -> tuple[str, ...]:
        return tuple(s for s in self.sites if site_region(s) == region)

    def region_writes(self, region: str) -> tuple[tuple[str, str], ...]:
        return self.writes if region == "low" else self.high_writes

    def region_spread(self, region: str) -> str:
        return self.spread if region == "low" else self.high_spread


_JEEP_LOW = (("mlp_out", "mlp"),)
_JEEP_HIGH = (("mlp_out", "pred_residual"),)
_JEEP_SITES = ("mlp", "pred_residual")

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("memit", ("residual",), (("mlp_out", "residual"),), "even", "memit",
               "MEMIT: residual-stream target at the last critical layer, even spread"),
        Method("pmet", ("attn", "mlp"), (("mlp_out", "mlp"),), "sqrt", "pmet",
               "PMET: joint attention+MLP targets, MLP target written, square-root spread"),
        Method("pmet-mlp-only", ("mlp",), (("mlp_out", "mlp"),), "sqrt", "pmet",
               "PMET ablation 'w/o δ^a': only the MLP target is optimised"),
        Method("pmet-attn-write", ("attn", "mlp"), (("attn_out", "attn"), ("mlp_out", "mlp")), "sqrt", "pmet",
               "PMET ablation 'w/ W_O': the attention output projection is written too"),
        Method("pmet-even", ("attn", "mlp"), (("mlp_out", "mlp"),), "even", "pmet",
               "PMET ablation 'even spread'"),
        # JEEP: δ' on the MLP output m^{L'} at the subject's last token (as the public code; PMET's
        # value space, where the square-root spread of step 2 applies), δ* on the residual stream
        # h^{L*} at the prediction token (as the paper; MEMIT's value space, where the even spread of
        # step 3 is derived).  Optimised together; low MLPs written first, then high MLPs.
        Method("jeep", _JEEP_SITES, _JEEP_LOW, "sqrt", "jeep",
               "JEEP: joint low (subject, m^L') + high (prediction, h^L*) targets; sqrt spread low, even spread high",
               high_writes=_JEEP_HIGH, high_spread="even"),
        Method("jeep-low-only", ("mlp",), _JEEP_LOW, "sqrt", "jeep",
               "JEEP ablation 'w/o δ* & Step3': only the low region is optimised and written"),
        Method("jeep-high-only", ("pred_residual",), (), "sqrt", "jeep",
               "JEEP ablation 'w/o δ' & Step2': only the high region is optimised and written",
               high_writes=_JEEP_HIGH, high_spread="even"),
        Method("jeep-no-step3", _JEEP_SITES, _JEEP_LOW, "sqrt", "jeep",
               "JEEP ablation 'w/o Step3': both targets optimised together, only the low region written"),
        Method("jeep-no-step2", _JEEP_SITES, (), "sqrt", "jeep",
               "JEEP ablation 'w/o Step2': both targets optimised together, only the high region written",
               high_writes=_JEEP_HIGH, high_spread="even"),
        Method("jeep-separate", _JEEP_SITES, _JEEP_LOW, "sqrt", "jeep",
               "JEEP ablation 'separate optimisation': δ' optimised and written, then δ* on the updated model",
               high_writes=_JEEP_HIGH, high_spread="even", joint=False),
        Method("jeep-even", _JEEP_SITES, _JEEP_LOW, "even", "jeep",
               "JEEP ablation 'even spread in Step2'",
               high_writes=_JEEP_HIGH, high_spread="even"),
        Method("jeep-attn-high", _JEEP_SITES, _JEEP_LOW, "sqrt", "jeep",
               "JEEP ablation 'w/ MHSA in Step3': the high region writes attention output projections",
               high_writes=(("attn_out", "pred_residual"),), high_spread="even"),
    ]
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
