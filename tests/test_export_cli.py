"""``editledger export`` and the optional DVC ``export`` stage on the tiny project (issue 22).

The ledger holds real edits (the pipeline's stages on the tiny Llama): batches 1 and 2, then a
revert to 1.  An export must give the logits of ``editledger materialize`` of the same entry when
read by PEFT or transformers' GGUF loader; bad input is one line on stderr, exit code 2, and
changes nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.models.loading import find_default_gguf
from pipeline.stages.common import Project
from pipeline.stages.export import gguf_source
from pipeline_support import DVC, run
from reliability_support import cli, small_ledger, tree_digest

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
TEXT = "The mother tongue of Danielle Darrieux is English. Toko Yasuda plays the piano."


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return small_ledger(tmp_path_factory.mktemp("export-cli"))


def copy_of(project: Path, name: str) -> Path:
    repo = project.parent / name  # a sibling: ../shared/data still resolves
    shutil.copytree(project, repo, symlinks=True)
    return repo


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model.eval()(ids).logits.double()


def test_exports_give_the_logits_of_materialize(project, tmp_path):
    out = cli(project, "export", "2", "--format", "peft", tmp_path / "adapter").stdout
    assert re.search(r"as a PEFT LoRA adapter, 2 matrices of rank 4, .*\nread back with PEFT: max \|Δ logit\| ", out)
    out = cli(project, "export", "2", "--format", "gguf", tmp_path / "edited.gguf").stdout
    assert "metadata built from the config" in out and "read back with transformers' GGUF loader" in out
    cli(project, "materialize", "2", tmp_path / "materialized")
    tok = AutoTokenizer.from_pretrained(project / "data" / "model")
    ids = tok(TEXT, return_tensors="pt").input_ids
    expected = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "materialized"), ids)
    base = AutoModelForCausalLM.from_pretrained(project / "data" / "model")
    assert not torch.equal(logits(base, ids), expected)  # the edits change the logits ...
    adapter = logits(PeftModel.from_pretrained(base, str(tmp_path / "adapter")), ids)
    gguf = logits(AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="edited.gguf"), ids)
    scale = float(expected.abs().max())
    assert float((adapter - expected).abs().max()) <= 1e-5 * scale  # ... and both exports carry them
    assert float((gguf - expected).abs().max()) <= 1e-6 * scale


def test_head_after_a_revert_is_the_reverted_to_state(project, tmp_path):
    cli(project, "export", "head", "--format", "peft", tmp_path / "head")
    cli(project, "export", "1", "--format", "peft", tmp_path / "one")
    head = json.loads((tmp_path / "head" / "editledger.json").read_text())
    one = json.loads((tmp_path / "one" / "editledger.json").read_text())
    assert head["entry_dir"].startswith("0003-") and one["entry_dir"].startswith("0001-")
    assert head["state_fingerprint"] == one["state_fingerprint"]  # the revert's state is entry 1's ...
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("head", "one"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # ... and so are its factors


@dataclass
class Bad:
    name: str
    args: list
    expect: str
    setup: object = None


def _corrupt_deltas(repo: Path) -> None:
    d = next(p for p in sorted((repo / "ledger").iterdir()) if p.name.startswith("0002-")) / "deltas.safetensors"
    data = bytearray(d.read_bytes())
    data[-3] ^= 0xFF
    d.write_bytes(bytes(data))


BAD = [
    Bad("base", ["base", "--format", "peft", "{out}/a"], r"'base' is the unedited model"),
    Bad("unknown-entry", ["9", "--format", "peft", "{out}/a"], r"no committed entry matches '9'"),
    Bad("malformed-entry", ["x!", "--format", "gguf", "{out}/m.gguf"], r"'x!' is not an entry reference"),
    Bad("unknown-format", ["2", "--format", "onnx", "{out}/a"], r"unknown export format 'onnx'; choose one of peft, gguf"),
    Bad("peft-in-float16", ["2", "--format", "peft", "--dtype", "f16", "{out}/a"], r"peft exports are written as f32"),
    Bad("gguf-in-bfloat16", ["2", "--format", "gguf", "--dtype", "bf16", "{out}/m.gguf"],
        r"gguf exports are written as f32 or f16, not 'bf16'"),
    Bad("rtol-out-of-range", ["2", "--format", "peft", "--rtol", "2", "{out}/a"], r"--rtol 2\.0 is not usable"),
    Bad("rtol-for-gguf", ["2", "--format", "gguf", "--rtol", "0.001", "{out}/m.gguf"], r"PEFT rank tolerance"),
    Bad("gguf-over-a-file", ["2", "--format", "gguf", "{out}/something"], r"something exists; choose a new path"),
    Bad("peft-into-a-full-directory", ["2", "--format", "peft", "{out}"], r"exists and is not an empty directory"),
    Bad("no-base-model", ["2", "--format", "gguf", "{out}/m.gguf"], r"no base model at .*run `dvc repro -P`",
        lambda repo: (repo / "data" / "model.json").unlink()),
    Bad("corrupt-deltas", ["2", "--format", "peft", "{out}/a"], r"deltas\.safetensors does not match its sha256",
        _corrupt_deltas),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.name)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(project, tmp_path, case):
    repo = copy_of(project, f"bad-{case.name}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "something").write_text("x")
    if case.setup:
        case.setup(repo)
    before = tree_digest(repo), tree_digest(outside)
    res = cli(repo, "export", *[str(a).format(out=outside) for a in case.args], code=None)
    assert res.exit_code == 2, (res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert re.search(case.expect, lines[0]), lines[0]
    assert (tree_digest(repo), tree_digest(outside)) == before


def test_the_optional_dvc_stage(project):
    repo = copy_of(project, "stage")
    assert "export" not in run([DVC, "stage", "list"], repo).stdout  # off by default: the main job is unchanged
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["export"].update(formats=["peft", "gguf"], entry="2", gguf_dtype="f16")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stages = run([DVC, "stage", "list"], repo).stdout
    assert re.search(r"export@peft\s+Outputs exports/peft", stages) and re.search(r"export@gguf\s+Outputs exports/gguf",
                                                                                  stages)
    assert "exports/peft: the state after entry 0002-" in cli(repo, "stage", "export", "--format", "peft").stdout
    cli(repo, "stage", "export", "--format", "gguf")
    assert sorted(p.name for p in (repo / "exports" / "gguf").iterdir()) == ["editledger.json", "model.gguf"]
    report = json.loads((repo / "exports" / "gguf" / "editledger.json").read_text())
    assert report["dtype"] == "f16" and report["entry_dir"].startswith("0002-") and report["round_trip"]
    first = (repo / "exports" / "gguf" / "model.gguf").read_bytes()
    cli(repo, "stage", "export", "--format", "gguf")  # a stage replaces its own output, with the same bytes
    assert (repo / "exports" / "gguf" / "model.gguf").read_bytes() == first
    assert (repo / "exports" / "peft" / "adapter_config.json").exists()


def test_the_gguf_metadata_of_a_builtin_model_comes_from_its_packaged_file(tmp_path):
    project = Project(tmp_path)
    assert gguf_source(project, {"source": "default"}).gguf_file == find_default_gguf()
    assert gguf_source(project, {"source": "smollm2-135m-instruct"}).gguf_file == find_default_gguf()
    local = gguf_source(project, {"source": str(tmp_path / "my-model")})
    assert local.gguf_file is None and local.model_dir == project.model_dir
