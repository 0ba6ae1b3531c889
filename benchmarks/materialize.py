"""Time `editledger materialize` after K batches (issue 3) on the default model.

Builds a scratch project whose base model is the default SmolLM2-135M (via the `model` stage)
and whose ledger holds N committed edit batches with deltas of the real shape (the MLP output
projections of the 5 edited layers, small random values): replay cost depends on the number and
size of deltas, not on how they were computed.  Then times the CLI `materialize` (load base,
replay, check fingerprints, save the HF directory) after each K in --at, median of --repeat runs.

    python benchmarks/materialize.py --n 30 --at 3 --at 30 --out benchmarks/results/materialize.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import typer

from pipeline.ledger import append_edit
from pipeline.models.loading import load_model
from pipeline.stages import model as model_stage
from pipeline.stages.common import Project

app = typer.Typer(add_completion=False)


@app.command()
def main(n: int = 30, at: list[int] = typer.Option([3, 30]), repeat: int = 3, layers: str = "1,2,3,4,5",
         out: Path = Path("benchmarks/results/materialize.json")):
    root = Path(tempfile.mkdtemp(prefix="editledger-mat-"))
    (root / ".dvc").mkdir()
    (root / "ledger").mkdir()
    project = Project(root)
    model_stage.run(project)
    lm = load_model(project.model_dir)
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in map(int, layers.split(","))]
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for k in range(n):
        deltas = {nm: torch.randn(lm.model.get_parameter(nm).shape, generator=gen) * 1e-4 for nm in names}
        req = [{"subject": f"Subject {k}", "prompt": "{} is a citizen of", "target_new": "Nowhere", "target_true": "Elsewhere"}]
        append_edit(root / "ledger", lm.fingerprint, req, "pmet", {"layers": [1, 2, 3, 4, 5]}, {}, deltas, model=lm.model)
    build_s = time.perf_counter() - t0
    results = {"batches": n, "edited_parameters_per_batch": len(names), "build_s": build_s, "materialize": {}}
    env = {**os.environ, "EDITLEDGER_ROOT": str(root)}
    for k in at:
        times = []
        for r in range(repeat):
            dest = root / f"out-{k}-{r}"
            t0 = time.perf_counter()
            subprocess.run([str(Path(sys.executable).parent / "editledger"), "materialize", str(k), str(dest)], check=True, env=env, cwd=root,
                           stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - t0)
        results["materialize"][str(k)] = {"median_s": statistics.median(times), "runs_s": times}
        print(f"materialize after {k} batches: median {statistics.median(times):.2f}s over {repeat} runs", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    app()
