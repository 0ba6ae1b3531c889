"""How much of each edited layer's key space a stream's history occupies (issue 18's "why").

The constrained rules keep the keys of earlier edits in place through ``H = Σ K_pᵀK_p`` (the sum a
lifelong checkpoint holds as ``history/…``).  A new edit can only be written without moving earlier
ones in directions ``H`` does not already pin, so the question of why a long stream drifts is how
many directions ``H`` pins, measured against what each rule weighs it with:

* ``rank99``: how many eigen-directions of ``H`` hold 99% of its trace (of ``d_in``);
* ``participation``: ``(tr H)² / tr H²``, the effective number of directions;
* null space (``P`` = the ``share`` of C's eigenvectors with the smallest eigenvalues): the share of
  ``tr H`` inside range(P), and ``pinned_ns``: eigenvalues of ``PHP`` above the rule's α (where the
  history outweighs the αI term, a direction is no longer free);
* joint rule: ``pinned_joint``: generalised eigenvalues of ``H v = μ λC v`` above 1 (where the
  history outweighs the preserved keys' prior λC);
* ``key_energy``: ``tr H / n`` against ``tr C`` (an edit's key against an average token's).

    python benchmarks/history_span.py --checkpoint CKPT --edits 2000 --label memit+joint-5k \
        --covariance-dtype float32 --out benchmarks/results/history_span.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rank_holding(values, share: float) -> int:
    """How many of the largest ``values`` (≥ 0) hold ``share`` of their sum."""
    import torch

    v = values.clamp(min=0).sort(descending=True).values
    return int((torch.cumsum(v, 0) < share * v.sum()).sum()) + 1


def span(history, cov, lam: float, share: float, alpha: float, n: int) -> dict:
    """The measures of the module doc for one layer (float64)."""
    import torch

    from pipeline.editing.solvers import null_space_projector

    h, c = history.double(), cov.double()
    hv = torch.linalg.eigvalsh(h)
    p = null_space_projector(torch.linalg.eigh(c), share)
    php = torch.linalg.eigvalsh(p @ h @ p)
    chol = torch.linalg.cholesky(lam * c)
    whitened = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol, h, upper=False).T, upper=False)
    mu = torch.linalg.eigvalsh((whitened + whitened.T) / 2)
    return {"d_in": h.shape[0], "rank99": rank_holding(hv, 0.99), "participation": float(hv.sum() ** 2 / (hv ** 2).sum()),
            "projector_rank": round(share * h.shape[0]), "in_projector": float(torch.trace(p @ h) / torch.trace(h)),
            "pinned_ns": int((php > alpha).sum()), "pinned_joint": int((mu > 1).sum()),
            "key_energy": float(torch.trace(h) / n / torch.trace(c))}


def covariance_for(cache: Path, layer: int, dtype: str):
    """The cached float second moment of ``mlp_out`` at ``layer`` computed in ``dtype``."""
    from safetensors import safe_open

    found = []
    for path in sorted((cache / f"mlp_out-{layer}").glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            key = json.loads((f.metadata() or {}).get("key", "{}"))
            if key.get("dtype") == dtype and "cov" in f.keys():
                found.append((path, f.get_tensor("cov")))
    if len(found) != 1:  # another model or corpus has its own entry: which one the stream read is not known here
        raise SystemExit(f"error: {len(found)} {dtype} covariances of mlp_out-{layer} under {cache}, need exactly one: "
                         + ", ".join(p.name for p, _ in found))
    return found[0][1]


def main(checkpoint: list[Path] = typer.Option(...), edits: list[int] = typer.Option(...),
         label: list[str] = typer.Option(...), lam: float = 5000.0, share: float = 0.75,
         alpha: float = 10.0, covariance_dtype: str = "float32", out: Path | None = None):
    """One row per (checkpoint, layer); ``--edits`` and ``--label`` give each checkpoint's count and name."""
    if not len(checkpoint) == len(edits) == len(label):
        raise typer.BadParameter("give one --edits and one --label per --checkpoint")
    from safetensors.torch import load_file

    from pipeline.models.loading import cache_home

    cache = cache_home() / "covariance"
    rows = []
    for path, n, name in zip(checkpoint, edits, label):
        hist = {k.split("@")[1]: v for k, v in load_file(path).items() if k.startswith("history/")}
        for layer in sorted(hist, key=int):
            row = {"label": name, "edits": n, "layer": int(layer),
                   **span(hist[layer], covariance_for(cache, int(layer), covariance_dtype), lam, share, alpha, n)}
            rows.append(row)
            typer.echo(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if out:
        out.write_text(json.dumps({"lam": lam, "share": share, "alpha": alpha, "covariance_dtype": covariance_dtype,
                                   "rows": rows}, indent=2))


if __name__ == "__main__":
    typer.run(main)
