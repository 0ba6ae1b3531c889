"""The report's figures, from the history table (row 0 = unedited model, then one row per batch).

Each function takes the table and returns PNG bytes; nothing here reads the ledger.  The x axis of
the metric curves is the number of requests active after the batch (row 0: no edit), so runs with
different batch sizes line up; the per-layer delta norms are per batch.
"""

from __future__ import annotations

import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display, no GUI toolkit: the report is rendered headless

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.evaluation.names import CONSISTENCY_KEY  # noqa: E402

COLORS = {"efficacy": "tab:blue", "generalization": "tab:orange", "specificity": "tab:green", "score": "tab:red"}


def evaluated_rows(history: pd.DataFrame) -> pd.DataFrame:
    """Row 0 and the evaluated edit batches, the points every metric curve is drawn through."""
    keep = (history["kind"] == "base") | ((history["kind"] == "edit") & history["post_efficacy"].notna())
    return history[keep]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} yet", ha="center", va="center", transform=ax.transAxes, color="gray")


def _series(ax, df: pd.DataFrame, column: str, **kw) -> bool:
    have = df[df[column].notna()]
    if have.empty:
        return False
    ax.plot(have["n_active_requests"].astype(float), have[column].astype(float), **kw)
    return True


def edit_metrics(history: pd.DataFrame) -> bytes:
    """Efficacy, generalisation, specificity (success rates) and score vs number of active edits:
    the batch's own requests (solid) and the retained earlier ones (dashed)."""
    df = evaluated_rows(history)
    fig, ax = plt.subplots(figsize=(6.2, 4))
    drawn = False
    for m, c in COLORS.items():
        drawn |= _series(ax, df, f"post_{m}", color=c, marker="o", label=f"{m} (batch)")
        drawn |= _series(ax, df, f"ret_{m}", color=c, marker="x", linestyle="--", label=f"{m} (retained)")
    for r in df[df["kind"] == "edit"].itertuples():  # each point names its batch: the table links its requests
        ax.annotate(str(r.seq), (float(r.n_active_requests), float(r.post_efficacy)), textcoords="offset points",
                    xytext=(0, 5), ha="center", fontsize=7, color="tab:blue")
    if not drawn:
        _empty(ax, "evaluated batch")
    else:
        ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.set(xlabel="requests active after the batch (0 = unedited model)", ylabel="success rate", ylim=(-0.03, 1.03),
           title="Edit success vs number of edits")
    ax.grid(alpha=0.3)
    return _png(fig)


def generation_metrics(history: pd.DataFrame) -> bytes:
    """Fluency (n-gram entropy) and consistency vs number of active edits."""
    df = evaluated_rows(history)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (m, label) in zip(axes, (("fluency", "fluency (n-gram entropy, bits)"),
                                      (CONSISTENCY_KEY, f"{CONSISTENCY_KEY} (TF-IDF cosine)"))):
        drawn = _series(ax, df, f"post_{m}", color="tab:purple", marker="o", label="batch")
        drawn |= _series(ax, df, f"ret_{m}", color="tab:purple", marker="x", linestyle="--", label="retained")
        if drawn:
            ax.legend(fontsize=7)
        else:
            _empty(ax, "generation")
        ax.set(xlabel="requests active after the batch", title=label)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    return _png(fig)


def perplexity(history: pd.DataFrame) -> bytes:
    """ME-PPL-50 perplexity vs number of active edits, with the unedited value as a reference line."""
    df = evaluated_rows(history)
    fig, ax = plt.subplots(figsize=(6.2, 4))
    if _series(ax, df, "ppl", color="tab:brown", marker="o", label="after the batch"):
        base = df[df["kind"] == "base"]["ppl"].dropna()
        if len(base):
            ax.axhline(float(base.iloc[0]), color="gray", linestyle=":", label="unedited")
        ax.legend(fontsize=7)
    else:
        _empty(ax, "perplexity")
    ax.set(xlabel="requests active after the batch", ylabel="perplexity", title="Collapse check: ME-PPL-50 perplexity")
    ax.grid(alpha=0.3)
    return _png(fig)


def layer_columns(history: pd.DataFrame) -> Sequence[str]:
    return [c for c in history.columns if c.startswith("delta_norm_layer_")]


def delta_norms(history: pd.DataFrame) -> bytes:
    """Frobenius norm of each edit batch's weight change per layer (from the ledger's manifests)."""
    cols = layer_columns(history)
    df = history[history["kind"] == "edit"]
    fig, ax = plt.subplots(figsize=(6.2, 4))
    drawn = False
    for c in cols:
        drawn |= bool(_plot_by_seq(ax, df, c, label=f"layer {c[len('delta_norm_layer_'):]}"))
    if drawn:
        ax.legend(fontsize=7, ncol=3)
    else:
        _empty(ax, "committed edit")
    ax.set(xlabel="batch (seq)", ylabel="‖ΔW‖ (Frobenius)", title="Weight change per layer, per batch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return _png(fig)


def health(history: pd.DataFrame) -> bytes:
    """Drift before collapse: the largest ‖W‖/‖W₀‖ of the edited matrices after each batch, and the
    collapse guard's ME-PPL-50 ratio where it judged the batch."""
    df = history[history["kind"] == "edit"]
    fig, ax = plt.subplots(figsize=(6.2, 4))
    drawn = _series(ax, df, "max_weight_norm_ratio", color="tab:red", marker="o", label="max ‖W‖/‖W₀‖")
    drawn |= _series(ax, df, "guard_ratio", color="tab:brown", marker="s", label="guard: ME-PPL-50 / unedited")
    if drawn:
        ax.axhline(1.0, color="gray", linestyle=":")
        ax.legend(fontsize=7)
    else:
        _empty(ax, "health record")
    ax.set(xlabel="requests active after the batch", ylabel="ratio to the unedited model",
           title="Health: weight norm growth and perplexity ratio")
    ax.grid(alpha=0.3)
    return _png(fig)


def _plot_by_seq(ax, df: pd.DataFrame, column: str, **kw) -> bool:
    have = df[df[column].notna()]
    if have.empty:
        return False
    ax.plot(have["seq"].astype(int), have[column].astype(float), marker="o", **kw)
    return True


FIGURES = (("Edit success", edit_metrics), ("Collapse", perplexity), ("Fluency and consistency", generation_metrics),
           ("Weight change per layer", delta_norms), ("Health", health))
