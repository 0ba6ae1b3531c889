"""JEEP, iterative and neighbour-assisted batches through the DVC pipeline of a tiny project:
the keys_values stage runs the interleaved passes, apply replays their spreads, the ledger
replays bit for bit, and the weights equal a direct ``pipeline.edit`` of the same batch."""

from __future__ import annotations

import copy
import json

import pandas as pd
import torch
import yaml

import pipeline
from conftest import make_model, tokenizer
from pipeline.editing.hparams import HParams
from pipeline.ledger import entries, materialize, verify
from pipeline.models.loading import load_model
from pipeline_support import RECORDS, TINY_HPARAMS, cli, dvc, git, make_project, requests_file
from test_jeep_iterative_na import _with_neighbors

torch.set_num_threads(1)



def test_iterative_na_and_jeep_batches_through_dvc(tmp_path):
    repo = make_project(tmp_path)
    hp_doc = copy.deepcopy(TINY_HPARAMS)
    hp_doc["methods"]["jeep"] = {"layers": [1], "high_layers": [2, 3], "clamp_norm_factor": 3.0,
                                 "high_clamp_norm_factor": 0.5}
    (repo / "hparams-tiny.yaml").write_text(yaml.safe_dump(hp_doc))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["covariance"]["layers"] = [1, 2, 3]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "jeep settings")

    model, tok = make_model("llama"), tokenizer(True)  # the project's base model
    na_records = _with_neighbors(model, tok)
    f1 = requests_file(repo, "b1", na_records)
    f2 = requests_file(repo, "b2", RECORDS[2:4])
    assert "pmet+iterative+na1" in cli(repo, "add", "--requests", str(f1), "--iterative", "--neighbors", "1").output
    cli(repo, "add", "--requests", str(f2), "--method", "jeep-separate")
    dvc(repo, "repro", "-P")

    ledger = repo / "ledger"
    e1, e2 = entries(ledger)
    assert e1.content["hparams"]["iterative"] is True and e1.content["hparams"]["neighbors"] == 1
    assert e2.content["method"] == "jeep-separate"
    res = verify(ledger, replay=True, load_base=lambda: load_model(repo / "data" / "model").model)
    assert res.ok, res.message()
    state1 = json.loads((e1.path / "state.json").read_text())
    iters = state1["metrics"]["iterations"]
    assert iters and all({"p_optimised", "p_updated", "abs_delta_p"} <= set(r) for r in iters)
    assert state1["metrics"]["editing_neighbors"] == [[0], [0]]
    # the editing neighbours are not part of batch 1's specificity
    ev = pd.read_parquet(e1.path / "eval.parquet")
    for i, rec in enumerate(na_records):
        prompts = set(ev[(ev["kind"] == "neighborhood") & (ev["request"] == i)]["prompt"])
        assert rec["neighborhood_prompts"][0] not in prompts and rec["neighborhood_prompts"][1] in prompts
    # ... nor of its retention, evaluated again after batch 2
    ret = pd.read_parquet(e2.path / "eval.parquet")
    ret = ret[(ret["phase"] == "retention") & (ret["batch"] == e1.dirname) & (ret["kind"] == "neighborhood")]
    for i, rec in enumerate(na_records):
        prompts = set(ret[ret["request"] == i]["prompt"])
        assert rec["neighborhood_prompts"][0] not in prompts and rec["neighborhood_prompts"][1] in prompts

    # the pipeline's weights after batch 1 are those of a direct edit with the same settings
    hp = HParams.from_dict(yaml.safe_load((e1.path / "batch.yaml").read_text())["hparams"])
    direct = pipeline.edit(make_model("llama"), tok, na_records, method="pmet", hparams=hp,
                           corpus=repo / "data" / "wikitext" / "wikitext2_raw_test.txt",
                           cache_dir=tmp_path / "direct-cov", progress=False)
    assert len(direct.iterations) == len(iters)
    after1 = materialize(ledger, e1.dirname, load_model(repo / "data" / "model").model, inplace=True)
    base = make_model("llama").state_dict()
    for name, d in direct.deltas.items():
        assert torch.equal(after1.state_dict()[name], base[name] + d), name
    # the batch stages declare what the interleaved passes and the exclusion read
    from pipeline.ledger.layout import KV_FILE

    st1 = yaml.safe_load((e1.path / "dvc.yaml").read_text())["stages"]
    st2 = yaml.safe_load((e2.path / "dvc.yaml").read_text())["stages"]
    assert "../../data/covariance" in st1["keys_values"]["deps"] and KV_FILE in st1["evaluate"]["deps"]
    assert "../../data/covariance" in st2["keys_values"]["deps"] and KV_FILE not in st2["evaluate"]["deps"]
