"""The prepared GPU measurement runs end to end (on the CPU, tiny configurations, ``--smoke``), and
the scaling benchmark's estimate is the arithmetic it states."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmark_support import BENCH, load_benchmark


def test_gpu_benchmark_smoke_runs_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke", "--out", str(out)], capture_output=True,
                       text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["smoke"] and r["device"] == "cpu" and r["n_requests"] == 3
    assert [e["engine"] for e in r["engines"]] == ["fast", "reference"]
    assert all(e["seconds_per_edit"] > 0 and e["n_requests"] == 3 for e in r["engines"])
    assert [c["dtype"] for c in r["covariance"]] == ["float32", "bfloat16"]
    assert all(c["tokens"] == 2000 and c["tokens_per_s"] > 0 for c in r["covariance"])
    big = r["big"]
    gpu = load_benchmark("gpu")
    assert big["shape"] == gpu.SMOKE_BIG and big["layers"] == [4, 5, 6, 7, 8]
    assert big["edit"]["seconds_per_edit"] > 0 and big["covariance"]["tokens"] == 2000
    assert big["memory_during_edit"]["peak_rss_mib"] > 0 and "peak_gpu_allocated_gib" not in big["memory_during_edit"]


def test_scaling_estimate_is_the_stated_arithmetic():
    s = load_benchmark("scaling")
    fl = s.gptj_flops()
    d, inner = 4096, 16384
    assert fl["products"] == 6 * 2 * inner * inner
    assert fl["blocks"] == 9 * (2 * (4 * d * d + 2 * d * inner) + 4 * 1024 * d)
    run = {"tokens_per_s": 500.0, "tokenise_tokens_per_s": 70_000.0, "read_tokens_per_s": 1e6,
           "flops_per_token": {"total": 6.8e7}}
    est = s.estimate({"1": {"runs": [run]}, "speedup_2_over_1": 1.8})
    tokens = s.ARTICLES * s.TOKENS_PER_ARTICLE
    assert est["gpu_tokens_per_s"] == s.GPU_FLOPS / fl["total"]
    one, eight = est["gpus_1"], est["gpus_8"]
    assert abs(one["forward_hours"] - tokens / est["gpu_tokens_per_s"] / 3600) < 1e-9
    assert abs(eight["forward_hours"] * 8 - one["forward_hours"]) < 1e-9
    assert abs(eight["tokenise_hours"] * 8 - 2 * tokens / 70_000.0 / 3600) < 1e-9  # counted once, read once: shared
    assert eight["read_hours"] == one["read_hours"] == 2 * tokens / 1e6 / 3600  # every process reads every text
    assert eight["total_hours"] == eight["forward_hours"] + eight["tokenise_hours"] + eight["read_hours"]
    assert est["measured_here"]["two_rank_efficiency"] == 0.9
