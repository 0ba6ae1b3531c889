"""Benchmark 3b (issue 6): `dvc repro -P` when nothing changed, with K batches in the ledger.

A no-op repro costs DVC's graph walk and hashing, which grows with the number of stages and
files, not with the model; so the ledger is built for real (``editledger add`` + ``dvc repro -P``,
every stage run) on the tests' tiny project (tiny random Llama, fake shared data), one request per
batch.  After K batches (each ``--at``), times ``--repeat`` no-op repros and reports the median.

    python benchmarks/dvc_noop.py --at 10 --at 100 --out benchmarks/results/dvc_noop.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pipeline_support import RECORDS, dvc, make_project, requests_file, run  # noqa: E402

app = typer.Typer(add_completion=False)


@app.command()
def main(at: list[int] = typer.Option([10, 100]), repeat: int = 3, out: Path = Path("benchmarks/results/dvc_noop.json")):
    tmp = Path(tempfile.mkdtemp(prefix="editledger-noop-"))
    repo = make_project(tmp)
    res: dict = {"project": "tests/pipeline_support.make_project (tiny Llama), 1 request per batch",
                 "repeat": repeat, "at": {}}
    have = 0
    for k in sorted(at):
        t0 = time.perf_counter()
        for i in range(have, k):
            f = requests_file(repo, f"batch{i + 1}", [RECORDS[i % len(RECORDS)]])
            run(["editledger", "add", "--requests", str(f)], repo)
        add_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dvc(repo, "repro", "-P")
        build_s = time.perf_counter() - t0
        have = k
        runs = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            text = dvc(repo, "repro", "-P").stdout
            runs.append(time.perf_counter() - t0)
            if "Running stage" in text:
                raise SystemExit(f"repro after {k} batches was not a no-op:\n{text[-2000:]}")
        res["at"][str(k)] = {"noop_median_s": statistics.median(runs), "noop_runs_s": runs,
                             "add_s": add_s, "repro_build_s": build_s}
        print(k, json.dumps(res["at"][str(k)]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    app()
