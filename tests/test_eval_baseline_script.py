"""Smoke test: ``benchmarks/eval_baseline.py`` runs end to end (on the tiny model, two records each)."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import make_model, tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_eval_baseline_script_runs(tmp_path):
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir, safe_serialization=True)
    tokenizer(True).save_pretrained(model_dir)
    out = tmp_path / "baseline.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_baseline.py"), "--model", str(model_dir),
                        "--n-counterfact", "2", "--n-zsre", "2", "--timing-batch", "2", "--threads", "1",
                        "--timing-threads", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["counterfact"]["n_evaluated"] == 2 and 0 <= res["counterfact"]["metrics"]["efficacy"] <= 1
    assert res["counterfact"]["metrics"]["fluency"] > 0 and res["me_ppl_50"]["perplexity"] > 1
    assert res["zsre"]["n_evaluated"] + res["zsre"]["n_skipped"] == 2
    assert res["timing_one_batch"]["batch_size"] == 2
