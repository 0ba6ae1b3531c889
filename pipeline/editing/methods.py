"""Editing methods as small declarative specs over one shared engine.

A method says *where* the target vectors are optimised at the last critical layer (``sites``),
*which* projections are written from which site's targets (``writes``), and how the residual is
divided over the critical layers (``spread``).  PMET, MEMIT and PMET's ablations differ only here.
"""

from __future__ import annotations

from dataclasses import dataclass

SITES = ("residual", "attn", "mlp")
# Which module's output each site is: the block output h^L, the attention output projection's
# output a^L, the MLP output projection's output m^L (the space its closed-form update is exact in).
SITE_ROLES = {"residual": "block", "attn": "attn_out", "mlp": "mlp_out"}
SPREADS = ("even", "sqrt")


class MethodError(ValueError):
    """Unknown method name or inconsistent method spec."""


@dataclass(frozen=True)
class Method:
    name: str
    sites: tuple[str, ...]
    writes: tuple[tuple[str, str], ...]  # (role written: "mlp_out" | "attn_out", site giving its targets)
    spread: str
    hparams_from: str  # which hyper-parameter section it uses (ablations share PMET's)
    description: str

    def __post_init__(self):
        if not set(self.sites) <= set(SITES):
            raise MethodError(f"{self.name}: unknown site in {self.sites}")
        if self.spread not in SPREADS:
            raise MethodError(f"{self.name}: unknown spread {self.spread!r}")
        for _, site in self.writes:
            if site not in self.sites:
                raise MethodError(f"{self.name}: writes from site {site!r} that is not optimised")


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
    ]
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
