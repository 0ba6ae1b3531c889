"""Writing the outputs of an edit run: one directory, written whole or not at all.

Everything goes into a temporary sibling directory that is renamed into place at the end, so an
interrupted run never leaves a half-written output that looks complete.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from safetensors.torch import save_file

from pipeline.models.loading import model_fingerprint


def versions() -> dict[str, str]:
    import torch
    import transformers

    from pipeline import __version__

    return {"editledger": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_edit_outputs(out: Path, lm, reqs, result, pre: dict, post: dict, pre_rows: pd.DataFrame,
                       post_rows: pd.DataFrame, save_model: bool = False) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        n = len(reqs)
        edit_s = sum(v for k, v in result.timings.items() if not k.startswith("evaluate"))
        metrics = {
            "method": result.method,
            "n_requests": n,
            "pre": pre,
            "post": post,
            "model_fingerprint": lm.fingerprint,
            "edited_fingerprint": model_fingerprint(lm.model),
            "timings": result.timings,
            "edit_seconds_per_request": edit_s / n,
            "peak_rss_mb": peak_rss_mb(),
            "versions": versions(),
        }
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        meta = {"method": result.method, "model_fingerprint": lm.fingerprint,
                "hparams": json.dumps(result.hparams.to_dict(), sort_keys=True)}
        save_file({k: v.contiguous() for k, v in result.deltas.items()}, str(tmp / "deltas.safetensors"), metadata=meta)
        (tmp / "edit.json").write_text(json.dumps({
            "method": result.method, "hparams": result.hparams.to_dict(), "prefixes": result.prefixes,
            "covariance_ids": result.covariance_ids, "steps": result.steps, "layers": result.layers,
            "modifiers": result.hparams.modifiers, "iterations": result.iterations,
            "editing_neighbors": result.editing_neighbors,
            "requests": [r.canonical() for r in reqs],
        }, indent=2, ensure_ascii=False))
        pd.DataFrame(result.traces).to_parquet(tmp / "trace.parquet", index=False)
        pre_rows.to_parquet(tmp / "eval_pre.parquet", index=False)
        post_rows.to_parquet(tmp / "eval_post.parquet", index=False)
        if save_model:
            lm.model.save_pretrained(tmp / "model", safe_serialization=True)
            lm.tokenizer.save_pretrained(tmp / "model")
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.exists():
            out.rmdir()  # only an empty directory gets here (checked before any work)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
