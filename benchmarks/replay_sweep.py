"""Issue 18 §6: update-rule settings tried on a whole recorded stream, without optimising a value.

A lifelong stream's cost is the value optimisation (≈ 400 s per batch of 100 on one core); the
update rule (solver, λ, null-space share, α, norm term) only spreads the targets it was given.  So
a finished stream's committed targets (``targets/NNNN.safetensors`` of ``benchmarks/lifelong.py``)
are spread again, batch after batch, under other rule settings — the history each setting would
have written *had its targets been the recorded ones* (keys, residuals and ``K_p`` are read on the
model that setting edited, exactly as the ledger's ``apply`` stage replays an entry).  This is a
proxy: a real stream optimises each batch's targets on the model its own setting has edited, so
its targets differ from the recorded ones (the real MEMIT + joint λ 5,000 stream's ‖W‖/‖W₀‖
stayed within 0.006 of this replay's over its first 600 edits).  It ranks settings by the
perplexity drift a whole stream causes, at 18–27 s per batch of 100 on one core instead of ≈ 450
(RESULTS §5.4); the winner is then checked on a real stream.

Per point: ‖W‖/‖W₀‖ after every batch, ME-PPL-50 every ``--ppl-every`` batches, and at the end the
teacher-forced metrics of a seeded sample of the stream's edits.  The setting the targets were
recorded with reproduces the stream itself (its curve's norms: checked, as a sanity row).

    python benchmarks/replay_sweep.py --source benchmarks/results/lifelong_n2000_b100_s0/memit+ns \\
        --points '[{"solver": "joint", "mom2_update_weight": 10000}]'
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lifelong import (VARIANTS, append_jsonl, load_targets, norm_ratios, pick, read_jsonl,  # noqa: E402
                      variant_hparams)


def sample_indices(n: int, k: int, seed: int = 0) -> list[int]:
    """A seeded sample of ``k`` of the stream's ``n`` edits (sorted), the same for every point."""
    return sorted(random.Random(seed).sample(range(n), min(k, n)))


def spread_history(model, tok, fingerprint: str, reqs: list, stored: list[Path], method: str, hp, batch: int,
                   base_state: dict, ppl: Callable[[], float], ppl_every: int,
                   report: Callable[[dict], None] = lambda row: None, **edit_kw) -> list[dict]:
    """Edit ``model`` (at ``base_state``) with the recorded targets ``stored``, batch after batch, under
    ``hp``: keys, residuals and the history ``Σ KᵀK`` are read on the model this history edited.
    One row per batch: edits so far, max ‖W‖/‖W₀‖ and (every ``ppl_every`` batches) ``ppl()``;
    ``edit_kw`` go to :func:`~pipeline.editing.engine.edit` (a corpus and cache other than the default)."""
    from pipeline.editing.engine import edit
    from pipeline.editing.history import extended

    history: dict = {}
    changed: set[str] = set()
    curve = []
    for b, path in enumerate(stored):
        res = edit(model, tok, reqs[b * batch:(b + 1) * batch], method=method, hparams=hp, apply=True,
                   fingerprint=fingerprint, progress=False, history=history or None, replay=load_targets(path),
                   **edit_kw)
        history = extended(history, res.keys)
        changed |= set(res.deltas)
        norms = norm_ratios(model.state_dict(), base_state, changed)
        curve.append({"edits": (b + 1) * batch, "max_norm_ratio": max(norms.values()),
                      "me_ppl_50": ppl() if (b + 1) % ppl_every == 0 else None})
        report(curve[-1])
    return curve


def main(source: Path = typer.Option(..., help="a variant directory of a lifelong run"),
         points: str = typer.Option(..., help="JSON list of overrides"), batch: int = 100, start: int = 0,
         sample: int = 200, ppl_every: int = 5, batches: int = 0, hparams: str = "smollm2-135m-instruct",
         out: Path | None = None):
    """Spread ``source``'s recorded targets under each point of ``points`` (JSON list of overrides
    on the source variant's settings); one JSON row per point appended to ``out``."""
    import torch

    from pipeline.data import me_ppl_texts, sample_records
    from pipeline.evaluation.perplexity import perplexity
    from pipeline.evaluation.protocols import evaluate
    from pipeline.models.loading import load_model
    from pipeline.requests import parse_requests

    variant = source.name
    if variant not in VARIANTS:
        raise typer.BadParameter(f"{source} is not a variant directory of benchmarks/lifelong.py")
    settings = json.loads((source / "settings.json").read_text())["hparams"]
    recorded = read_jsonl(source / "curve.jsonl")
    n_batches = batches or len(recorded)
    stored = [source / "targets" / f"{b + 1:04d}.safetensors" for b in range(n_batches)]
    if missing := [p.name for p in stored if not p.exists()]:
        raise typer.BadParameter(f"{source} lacks the targets {', '.join(missing[:3])}")
    out = out or source.parent.parent / f"replay_sweep_{source.parent.name}_{variant}.jsonl"
    torch.manual_seed(0)
    lm = load_model()
    model, tok = lm.model, lm.tokenizer
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n = n_batches * batch
    reqs = parse_requests(copy.deepcopy(sample_records("counterfact", start, n)))
    chosen = sample_indices(n, sample)
    texts = me_ppl_texts()
    for point in json.loads(points):
        method, hp = variant_hparams(variant, hparams, {**settings, **point})
        model.load_state_dict(base_state)
        t_start = time.perf_counter()
        curve = spread_history(model, tok, lm.fingerprint, reqs, stored, method, hp, batch, base_state,
                               lambda: perplexity(model, tok, texts), ppl_every,
                               lambda row: typer.echo(f"{json.dumps(point)} {json.dumps(row)}", err=True))
        edit_s = time.perf_counter() - t_start
        metrics, _ = evaluate(model, tok, [reqs[i] for i in chosen])
        row = {"source": str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else str(source),
               "point": point, "method": method, "edits": n, "sample": len(chosen), **pick(metrics),
               "me_ppl_50": curve[-1]["me_ppl_50"] or perplexity(model, tok, texts),
               "max_norm_ratio": curve[-1]["max_norm_ratio"], "curve": curve, "spread_s": round(edit_s, 1),
               # the recorded setting itself ({}) must reproduce the stream's norms (a check of the replay)
               "norm_drift_from_source": None if point else max(
                   abs(r["max_norm_ratio"] - x["max_norm_ratio"]) for r, x in zip(curve, recorded)),
               "threads": torch.get_num_threads()}
        append_jsonl(out, row)
        typer.echo(json.dumps({k: v for k, v in row.items() if k != "curve"}))
    model.load_state_dict(base_state)


if __name__ == "__main__":
    typer.run(main)
