"""PNG plots of the probe tables (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_similarity(df: pd.DataFrame, path: Path, title: str = "") -> None:
    """Mean cosine and top-k Jaccard per layer, attention vs MLP (PMET Fig. 2)."""
    plt = _plt()
    jac = next(c for c in df.columns if c.startswith("jaccard"))
    mean = df.groupby(["component", "layer"])[["cosine", jac]].mean().reset_index()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, col in zip(axes, ("cosine", jac)):
        for comp, style in (("attention", "o-"), ("mlp", "s-")):
            part = mean[mean["component"] == comp]
            ax.plot(part["layer"], part[col], style, ms=3, label="MHSA (attention)" if comp == "attention" else "FFN (MLP)")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"mean {col.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or f"hidden state before vs after each component (last token, {df['record'].nunique()} records)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_logit_lens(df: pd.DataFrame, path: Path, title: str = "") -> None:
    """Mean probability and mean rank per layer of the original vs the target answer, at the
    subject's last token and the prediction token (JEEP Fig. 2)."""
    plt = _plt()
    mean = df.groupby(["position", "answer", "layer"])[["prob", "rank"]].mean().reset_index()
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for r, pos in enumerate(("subject_last", "prediction")):
        for c, col in enumerate(("rank", "prob")):
            ax = axes[r, c]
            for ans, style in (("original", "o-"), ("target", "s-")):
                part = mean[(mean["position"] == pos) & (mean["answer"] == ans)]
                ax.plot(part["layer"], part[col], style, ms=3, label=f"{ans} answer")
            if col == "rank":
                ax.set_yscale("log")
                ax.invert_yaxis()  # up = more information (rank towards 0)
            ax.set_title(f"{pos.replace('_', ' ')}: mean {col}")
            ax.grid(alpha=0.3)
            ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("layer")
    fig.suptitle(title or f"contrast logit lens ({df['record'].nunique()} records)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
