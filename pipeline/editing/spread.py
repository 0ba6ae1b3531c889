"""Writing target values into the weights: each region's layers, lowest first.

At every written layer ``l`` of a region, the keys of the batch's requests are read with the
current weights (the layers below are already updated), the current value at the region's site is
read at its last layer, and the layer writes its share of the gap:
``R = (target − current) / divisor``, where MEMIT's even spread divides by the number of layers
left (``L − l + 1`` for a contiguous window) and PMET's square-root spread by its square root, so
lower layers take a larger share.  The update rule (:mod:`pipeline.editing.solvers`) turns keys and
residuals into the weight change; it is added in place.  Snapshot and restore are the driver's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from pipeline.editing.hparams import HParams
from pipeline.editing.keys import RequestKeys, site_values
from pipeline.editing.methods import Region
from pipeline.editing.optimise import ValueResult
from pipeline.editing.solvers import SOLVERS, LayerSystem


def spread_divisor(spread: str, remaining: int) -> float:
    """Share of the residual written at a layer with ``remaining`` critical layers left (itself included)."""
    if remaining < 1:
        raise ValueError(f"remaining layers must be ≥ 1, got {remaining}")
    if spread == "even":
        return float(remaining)
    if spread == "sqrt":
        return math.sqrt(remaining)
    raise ValueError(f"unknown spread {spread!r}")


def layer_key(role: str, layer: int) -> str:
    """How a written projection is named in covariance ids, history state and stored keys."""
    return f"{role}@{layer}"


def written_projections(regions: tuple[Region, ...]) -> list[tuple[str, int]]:
    """Every (role, layer) the regions write, in writing order."""
    return [(role, layer) for r in regions for layer in r.layers for role, _ in r.writes]


@dataclass
class SpreadResult:
    layers: list[dict]  # one row per written (layer, role): norms of keys, residual and update
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # "role@layer" → [N, d_in] keys used


@torch.no_grad()
def spread(model, tok, adapter, reqs, prefixes: list[str], regions: tuple[Region, ...], values: ValueResult,
           covs: Mapping[tuple[str, int], torch.Tensor], hp: HParams,
           history: Mapping[str, torch.Tensor] | None = None,
           spectra: Mapping[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> SpreadResult:
    """Write ``values.targets`` of every region into its layers, in place.  ``history`` ("role@layer"
    → Σ K_pᵀK_p) and ``spectra`` ((role, layer) → eigen-decomposition of the covariance) are what
    the update rule may read (:class:`~pipeline.editing.solvers.LayerSystem`)."""
    solve = SOLVERS[hp.solver].solve
    out = SpreadResult([])
    readers: dict[str, RequestKeys] = {}  # per token position: keys of successive layers, each read resumed
    for region in regions:
        for i, layer in enumerate(region.layers):
            divisor = spread_divisor(region.spread, len(region.layers) - i)
            for role, site in region.writes:
                if region.position not in readers:
                    readers[region.position] = RequestKeys(model, tok, adapter, reqs, prefixes, region.position)
                keys = readers[region.position](role, layer)
                current = site_values(model, tok, adapter, reqs, site, region.last_layer)
                gap = values.targets[site] - current
                resid = gap / divisor
                name = layer_key(role, layer)
                system = LayerSystem(keys, resid, covs[(role, layer)], region.mom2_update_weight,
                                     (history or {}).get(name), (spectra or {}).get((role, layer)))
                upd, info = solve(system, hp)
                if not torch.isfinite(upd).all():
                    raise FloatingPointError(f"non-finite update at layer {layer} ({role}); check λ and the covariance")
                w = adapter.weight(model, role, layer)
                w.add_(upd.to(w.dtype))
                out.keys[name] = keys
                out.layers.append({"layer": layer, "role": role, "site": site, "region": region.name, "divisor": divisor,
                                   "key_norm": float(keys.norm(dim=-1).mean()), "resid_norm": float(resid.norm(dim=-1).mean()),
                                   "target_gap_norm": float(gap.norm(dim=-1).mean()), "update_norm": float(upd.norm()),
                                   **info})
    return out
