"""Benchmarks are not tests, but each script must still start: import everything it uses and
parse its command line (``--help``).  Catches renamed APIs the benchmarks depend on."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))


def test_every_benchmark_is_listed():
    assert {"covariance.py", "engine_speed.py", "dvc_noop.py", "materialize.py", "sweep.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script):
    p = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "--" in p.stdout  # typer printed its options
