"""Where a value-optimisation step spends its time (issue 6: profile before optimising).

Runs the engine's value optimisation (``optimise_targets``) on CounterFact dev requests with a few
steps under ``torch.profiler`` and prints the operators by self CPU time, plus the wall time per
step.  One warm-up run first (allocator, kernels), so the profiled run is the steady state.

    python benchmarks/profile_values.py --n 25 --steps 4 --out benchmarks/results/profile_values.txt
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import typer

from pipeline.editing.context import context_prefixes
from pipeline.editing.targets import optimise_targets
from pipeline.editing.hparams import load_hparams
from pipeline.editing.methods import get_method, sites_of
from pipeline.requests import parse_requests
from pipeline.models.adapters import adapter_for
from pipeline.models.loading import load_model

COUNTERFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "multi_counterfact_dev.json"
app = typer.Typer(add_completion=False)


@app.command()
def main(n: int = 25, start: int = 0, steps: int = 4, method: str = "pmet", engine: str = "fast",
         override: str = typer.Option("{}", help="JSON hyper-parameter overrides"), repeat: int = 1,
         profile: bool = True, rows: int = 25,
         shapes: bool = typer.Option(False, help="group operators by input shapes"), out: Path | None = None):
    lm = load_model()
    spec = get_method(method)
    hp = load_hparams("smollm2-135m-instruct", spec.hparams_from, {"v_num_grad_steps": steps, **json.loads(override)})
    reqs = parse_requests(json.loads(COUNTERFACT.read_text())[start : start + n])
    prefixes = context_prefixes(lm.model, lm.tokenizer, hp)
    adapter = adapter_for(lm.model)
    sites = sites_of(spec.resolve(hp))
    run = lambda: optimise_targets(lm.model, lm.tokenizer, adapter, reqs, prefixes, sites, hp, engine)  # noqa: E731
    run()  # warm-up
    walls, cpus = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    report = (f"{method}, {engine}, {n} requests (dev {start}-{start + n - 1}), {steps} steps, overrides {override}, "
              f"{torch.get_num_threads()} threads, setup included: wall {statistics.median(walls):.2f} s "
              f"({statistics.median(walls) / steps:.3f} s/step), process CPU {statistics.median(cpus):.2f} s "
              f"(medians of {repeat}; CPU time is the steadier figure on a shared machine)\n")
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=shapes) as prof:
            run()
        report += prof.key_averages(group_by_input_shape=shapes).table(sort_by="self_cpu_time_total", row_limit=rows)
    typer.echo(report)
    if out:
        out.write_text(report + "\n")


if __name__ == "__main__":
    app()
