"""Choosing JEEP's high region from the contrast logit lens (how the bundled layers were picked).

JEEP edits the layers where the *original* answer is promoted at the prediction token while the
target answer is not ("probability promotion", early high layers), and avoids the last layers,
which act as distribution normalisers.  The contrast at layer ``l`` is the mean over records of
``log P_l(o) − log P_l(o*)`` at the prediction token; its growth over a window of layers
``[a, b]`` is ``c_b − c_{a−1}``.  The chosen window is the one of ``width`` layers, above the low
region and below the last ``exclude_last`` layers, where the contrast grows most.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def contrast_curve(df: pd.DataFrame, position: str = "prediction") -> pd.Series:
    """Mean ``log P(original) − log P(target)`` per layer at ``position`` (a contrast_logit_lens table)."""
    part = df[df["position"] == position].copy()
    part["logp"] = np.log(part["prob"].clip(lower=1e-30))
    wide = part.pivot_table(index=["record", "layer"], columns="answer", values="logp").reset_index()
    wide["contrast"] = wide["original"] - wide["target"]
    return wide.groupby("layer")["contrast"].mean().sort_index()


def promotion_window(df: pd.DataFrame, width: int, above: int, exclude_last: int = 2) -> tuple[list[int], pd.Series]:
    """The ``width`` consecutive layers ``> above`` (and before the last ``exclude_last``) over which
    the prediction-token contrast grows most; returns them and the per-window growth."""
    c = contrast_curve(df)
    n_layers = int(c.index.max()) + 1
    growth = {}
    for a in range(above + 1, n_layers - exclude_last - width + 1):
        b = a + width - 1
        growth[a] = float(c.loc[b] - c.loc[a - 1])
    if not growth:
        raise ValueError(f"no window of {width} layers above layer {above} and below the last {exclude_last}")
    best = max(growth, key=growth.get)
    return list(range(best, best + width)), pd.Series(growth, name="contrast_growth")
