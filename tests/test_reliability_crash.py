"""SIGKILL at random and at named points of `editledger add`, the apply stage and `editledger revert`.

The suite runs the harness script itself (benchmarks/crash_harness.py, whose full run of ≥100
kills is checked in as benchmarks/results/crash_harness.json) for ten kills with a fixed seed: it
proves that the script starts and reports, and that every kill is survived.  After every kill the
harness requires ``editledger verify --replay`` to pass, no half-written entry to exist or be
active, and a rerun to complete the interrupted work without leaving temporary files; a kill at a
named point must really end the process by SIGKILL there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from pipeline_support import env

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("add", "apply", "revert")


def test_the_harness_script_survives_ten_random_kills(tmp_path):
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "crash_harness.py"), "--kills", "10", "--seed", "7",
                        "--out", str(out)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    res = json.loads(out.read_text())
    assert p.returncode == 0, (res["error"], res["failures"], p.stderr[-3000:])
    assert res["kills_attempted"] == res["kills_survived"] == 10 and res["error"] is None
    assert "survived 10/10 kills" in p.stdout
    phases = res["phases"]
    assert set(phases) == set(PHASES) and all(phases[k]["kills"] >= 1 for k in PHASES), phases
    modes = sum((Counter(phases[k]["modes"]) for k in PHASES), Counter())
    assert modes["point"] > 0 and modes["delay"] > 0, modes  # both kinds of kill happened
    landed = sum((Counter(phases[k]["outcomes"]) for k in PHASES), Counter())
    assert landed["partial-outputs"] + landed["temp-files-only"] > 0, landed  # some kills hit a write
    assert res["final_verify"].startswith("ok:") and "hash chain and replay" in res["final_verify"]
