"""Issue 20, part 3: what a long history costs — no-op `dvc repro -P`, `editledger verify`,
`editledger materialize` of the latest state and `editledger log` after N batches.

A real DVC project (the tests' tiny project: tiny random Llama, fake shared data, root stages
computed by `dvc repro -P`) whose ledger holds N one-request edit batches.  Computing N batches
for real takes about 19 s each, so they are *synthetic*, as in `benchmarks/materialize.py`: every
batch directory is what `editledger add` writes (batch.yaml, requests.parquet, the real stage file),
its stage outputs are written by the ledger's own commit code with small random deltas and keys
(placeholder keys_values/trace/eval files), and `dvc commit -f` records them in the dvc.lock files
as a repro would.  With ``--checkpoint-every K`` a checkpoint is appended after every K batches,
as `editledger add` does with `ledger.checkpoint_every: K` (0: none — the growth without them).

The build is O(N): the committing code reads the chain through a stand-in for ``load`` that
returns the part it needs from memory, and fsync is skipped (durability is not measured here).
The timed commands are the real CLI in fresh processes.  The machine's load average is recorded
before and after every measurement: on a shared machine the figures are upper bounds.

    python benchmarks/ledger_scale.py --batches 1000 --checkpoint-every 20 --out benchmarks/results/ledger_scale_1000.json
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pipeline_support import BIN, dvc, env, make_project  # noqa: E402

from pipeline.ledger import atomic, commit as commit_module  # noqa: E402
from pipeline.ledger.append import add_checkpoint  # noqa: E402
from pipeline.ledger.batch import Batch, write_batch_dir  # noqa: E402
from pipeline.ledger.chain import EMPTY, ChainState, step  # noqa: E402
from pipeline.ledger.commit import commit_checkpoint, commit_edit, write_evaluation  # noqa: E402
from pipeline.ledger.layout import KV_FILE, TRACE_FILE  # noqa: E402
from pipeline.models.loading import load_model  # noqa: E402
from pipeline.requests import parse_requests  # noqa: E402
from pipeline.stages.common import Project, resolve_hparams  # noqa: E402
from pipeline.stages.dvcfile import batch_dvc_yaml  # noqa: E402
from pipeline.stages.summary import ledger_table, parquet_bytes  # noqa: E402

app = typer.Typer(add_completion=False)


class Segment:
    """The chain since the last checkpoint, kept in memory: what ``load(..., upto=parent)`` returns
    to the committing code while the benchmark appends (the real reader is timed afterwards)."""

    def __init__(self):
        self.chain, self.states = [], []

    def load(self, ledger_dir, *, missing_ok=False, upto=None, since_checkpoint=False):
        assert not self.chain or self.chain[-1].dirname == upto, (upto, self.chain[-1].dirname)
        return list(self.chain), list(self.states)

    def append(self, entry) -> None:
        if entry.kind == "checkpoint":  # what the committing code needs starts again here
            self.chain, self.states = [entry], [ChainState(tuple((i, s) for i, s in entry.content["state"]))]
            return
        prev = self.states[-1] if self.states else EMPTY
        self.states.append(step(prev, entry, {e.id: s for e, s in zip(self.chain, self.states)},
                                {e.id: e for e in self.chain}))
        self.chain.append(entry)


@contextlib.contextmanager
def no_fsync():
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def build(repo: Path, n: int, every: int) -> dict:
    """Append ``n`` synthetic batches (and a checkpoint after every ``every``) to ``repo``'s ledger."""
    project = Project(repo)
    cfg = project.params()
    spec, hp = resolve_hparams(project, cfg, "pmet")
    lm = load_model(project.model_dir)
    base = load_model(project.model_dir).model
    model, fp = lm.model, lm.fingerprint
    names = [f"model.layers.{layer}.mlp.down_proj.weight" for layer in hp.layers]
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    cov = {f"mlp_out@{layer}": f"cov-{layer}" for layer in hp.layers}
    seg = Segment()
    commit_module.load = seg.load
    ledger = project.ledger
    parent, seq, t0 = None, 0, time.perf_counter()
    with no_fsync():
        for k in range(n):
            if every and k and k % every == 0:
                path = add_checkpoint(ledger, batch_dvc_yaml)
                seq += 1
                index = parquet_bytes(ledger_table(ledger, before_seq=seq))
                seg.append(commit_checkpoint(path, base, index))
                parent = path.name
            seq += 1
            req = parse_requests([{"subject": f"Subject {k}", "prompt": "{} is located in", "target_new": f"Place {k}",
                                   "target_true": f"Home {k}"}])
            batch = Batch(seq, "edit", parent, method=spec.name, engine="fast", seed=0, hparams=hp.to_dict())
            path = write_batch_dir(ledger, batch, req, batch_dvc_yaml)
            for name in (KV_FILE, TRACE_FILE):  # placeholders of the keys_values stage's outputs
                atomic.write_parquet(path / name, pd.DataFrame({"request": [0], "value": [0.0]}))
            deltas = {nm: torch.randn(params[nm].shape, generator=gen) * 1e-4 for nm in names}
            keys = {f"mlp_out@{layer}": torch.randn(1, params[names[0]].shape[1], generator=gen) for layer in hp.layers}
            entry = commit_edit(path, base_fingerprint=fp, covariance_ids=cov, deltas=deltas, model=model, apply=True,
                                keys=keys)
            write_evaluation(entry, pd.DataFrame({"phase": ["post"], "success": [1.0]}),
                             {"protocol": "counterfact", "base": {"efficacy": 0.0}, "pre": {"efficacy": 0.0},
                              "post": {"efficacy": 1.0}})
            seg.append(entry)
            parent = path.name
            if (k + 1) % 500 == 0:
                print(f"  built {k + 1} batches in {time.perf_counter() - t0:.0f}s", flush=True)
    return {"build_s": time.perf_counter() - t0, "directories": seq}


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], repo: Path, repeat: int, check_output=None) -> dict:
    """Wall time (median of ``repeat``) and the CPU time of the command's processes: on a shared
    machine the wall time grows with the load, the CPU time much less."""
    runs, cpu, loads = [], [], [load_now()]
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), _children_cpu()
        p = subprocess.run(cmd, cwd=repo, env=env(), capture_output=True, text=True)
        runs.append(time.perf_counter() - t0)
        cpu.append(_children_cpu() - c0)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        if check_output:
            check_output(p.stdout + p.stderr)
        loads.append(load_now())
    return {"median_s": round(statistics.median(runs), 3), "runs_s": [round(r, 3) for r in runs],
            "cpu_median_s": round(statistics.median(cpu), 3), "loadavg": loads}


def _noop(text: str) -> None:
    if "Running stage" in text:
        raise SystemExit(f"the repro was not a no-op:\n{text[-2000:]}")


@app.command()
def main(batches: int = typer.Option(1000, "--batches"), checkpoint_every: int = typer.Option(20, "--checkpoint-every"),
         repeat: int = 3, out: Path = typer.Option(Path("benchmarks/results/ledger_scale.json"), "--out"),
         repo: Path = typer.Option(None, "--repo", help="time the commands on a project this script built before "
                                                        "(its --batches/--checkpoint-every are recorded as given)")):
    res: dict = {"batches": batches, "checkpoint_every": checkpoint_every, "repeat": repeat, "cpus": os.cpu_count(),
                 "loadavg_start": load_now(), "project": "tests/pipeline_support.make_project (tiny Llama), "
                 "synthetic one-request batches"}
    if repo is None:
        repo = make_project(Path(tempfile.mkdtemp(prefix="editledger-scale-")))
        dvc(repo, "repro", "-P")  # the root stages, for real
        print(f"building {batches} batches in {repo}", flush=True)
        res.update(build(repo, batches, checkpoint_every))
        t0 = time.perf_counter()
        dvc(repo, "commit", "-f", "-q")
        res["dvc_commit_s"] = time.perf_counter() - t0
    res["repo"] = str(repo)
    ed = str(BIN / "editledger")
    latest = sorted(p.name for p in (repo / "ledger").iterdir() if p.is_dir())[-1]
    res["noop_repro"] = timed([str(BIN / "dvc"), "repro", "-P"], repo, repeat, _noop)
    res["verify"] = timed([ed, "verify"], repo, repeat)
    res["log"] = timed([ed, "log"], repo, repeat)
    res["materialize_latest"] = timed(["bash", "-c", f"rm -rf ../mat && {ed} materialize {latest} ../mat"], repo,
                                      repeat)
    res["verify_replay"] = timed([ed, "verify", "--replay"], repo, 1)
    res["loadavg_end"] = load_now()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)} |
                     {k: v["median_s"] for k, v in res.items() if isinstance(v, dict)}), flush=True)


if __name__ == "__main__":
    app()
