"""A catalogue of bad input: each is refused with one specific line on stderr, exit code 2, and
leaves every file of the project exactly as it was (the whole tree is hashed before and after).

The project is the tiny one of pipeline_support with a small computed ledger: edit batches 1 and 2,
then a revert to 1 (so 2 is reverted, 3 is the latest entry).  Each case works on its own copy.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import COUNTERFACT_RECORDS, make_config, make_model, tokenizer
from pipeline.ledger import LedgerLock
from pipeline.models.loading import model_fingerprint
from pipeline.stages.model import file_digests
from reliability_support import cli, small_ledger, tree_digest

CF = COUNTERFACT_RECORDS[0]  # Danielle Darrieux, P103, French → English


def cf(**rewrite) -> dict:
    rec = copy.deepcopy(CF)
    rec["requested_rewrite"].update(rewrite)
    return rec


def plain(**fields) -> dict:
    return {"subject": "Rome", "prompt": "{} is the capital of", "target_new": "France", "target_true": "Italy",
            **fields}


@dataclass
class Case:
    """``setup(repo, outside)`` prepares the bad input (``outside``: a scratch folder beside the
    project); ``args(repo, outside)`` is the command; ``expect`` a regex for the one error line."""

    name: str
    args: Callable[[Path, Path], list]
    expect: str
    setup: Callable[[Path, Path], None] | None = None


def requests_case(name: str, payload, expect: str) -> Case:
    def setup(repo, outside):
        data = payload if isinstance(payload, (str, bytes)) else json.dumps(payload)
        (outside / "req.json").write_bytes(data.encode() if isinstance(data, str) else data)

    return Case(name, lambda repo, outside: ["add", "--requests", outside / "req.json"], expect, setup)


def set_params(repo: Path, **changes) -> None:
    """``set_params(repo, edit__overrides={...})``: nested keys joined by ``__``."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = params
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def params_case(name: str, expect: str, args=("add", "--requests", "{good}"), text: str | None = None,
                **changes) -> Case:
    """Bad settings in params.yaml (or its whole ``text``), then a command that reads them."""
    def setup(repo, outside):
        (outside / "good.json").write_text(json.dumps(COUNTERFACT_RECORDS[2:3]))
        if text is not None:
            (repo / "params.yaml").write_text(text)
        if changes:
            set_params(repo, **changes)

    return Case(name, lambda repo, outside: [str(a).replace("{good}", str(outside / "good.json")) for a in args],
                expect, setup)


def model_dir_case(name: str, expect: str, build: Callable[[Path], None]) -> Case:
    """A broken model directory (outside the project) named by model.path; `stage model` loads it."""
    def setup(repo, outside):
        build(outside / "model")
        set_params(repo, model__path=str(outside / "model"))

    return Case(name, lambda repo, outside: ["stage", "model"], expect, setup)


def _weights_missing(d: Path) -> None:
    make_model("llama").save_pretrained(d, safe_serialization=True)
    tokenizer(True).save_pretrained(d)
    for f in d.glob("*.safetensors"):
        f.unlink()


def _tokenizer_mismatch(d: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(make_config("llama", 64)).save_pretrained(d)  # 64 < the tokenizer's ~420
    tokenizer(True).save_pretrained(d)


def _other_base_model(repo: Path, outside: Path) -> None:
    """data/model replaced by another model (consistent with data/model.json): not the ledger's base."""
    other = make_model("llama", seed=1)
    shutil.rmtree(repo / "data" / "model")
    other.save_pretrained(repo / "data" / "model", safe_serialization=True)
    tokenizer(True).save_pretrained(repo / "data" / "model")
    info = json.loads((repo / "data" / "model.json").read_text())
    info.update(fingerprint=model_fingerprint(other), files=file_digests(repo / "data" / "model"))
    (repo / "data" / "model.json").write_text(json.dumps(info))


def _batch(repo: Path, seq: int) -> Path:
    (d,) = (repo / "ledger").glob(f"{seq:04d}-*")
    return d


CASES = [
    # ---- the requests file
    requests_case("malformed-json", '[{"subject": "X",', r"malformed JSON at line 1 column"),
    requests_case("not-utf8", b"\xff\xfe[\x00", r"not UTF-8 text"),
    requests_case("not-a-list", {"subject": "X"}, r"expected a JSON list of requests, got dict"),
    requests_case("record-not-an-object", [42], r"request 0: expected a JSON object, got int"),
    requests_case("unknown-format", [{"question": "?"}], r"request 0: unrecognised format"),
    requests_case("missing-field", [{"requested_rewrite": {"prompt": "{} is", "subject": "X"}}],
                  r"request 0: missing field 'target_new'"),
    requests_case("wrong-type", [plain(subject=42)], r"request 0: field 'subject' must be a string, got int"),
    requests_case("no-placeholder", [plain(prompt="Rome is the capital of")], r"placeholder '\{\}' exactly once, found 0"),
    requests_case("two-placeholders", [plain(prompt="{} and {} are")], r"exactly once, found 2"),
    requests_case("subject-not-in-prompt", [{"subject": "Rome", "src": "Where is Paris?", "alt": "Sweden",
                                             "answers": ["France"]}], r"subject 'Rome' not found in the prompt"),
    requests_case("empty-subject", [plain(subject="  ")], r"request 0: empty subject"),
    requests_case("empty-target", [cf(target_new={"str": ""})], r"request 0: empty target_new"),
    requests_case("whitespace-target", [plain(target_new=" \t ")], r"request 0: empty target_new"),
    requests_case("target-equals-true", [cf(target_new={"str": "French"})], r"target_new equals target_true"),
    requests_case("duplicate-request", [CF, CF], r"request 1: duplicate of request 0"),
    requests_case("conflict-same-prompt", [CF, cf(target_new={"str": "German"})],
                  r"request 1: conflicts with request 0: .* 'German' vs 'English'"),
    requests_case("conflict-same-relation", [CF, cf(prompt="{} speaks the language", target_new={"str": "German"})],
                  r"request 1: conflicts with request 0: subject 'Danielle Darrieux', relation P103"),
    requests_case("empty-batch", [], r"the batch holds no requests"),
    Case("missing-requests-file", lambda repo, outside: ["add", "--requests", outside / "nope.json"],
         r"cannot read requests file .*nope\.json: No such file"),
    # ---- method, hyper-parameters, params.yaml
    params_case("unknown-method", r"unknown method 'rome'", args=("add", "--requests", "{good}", "--method", "rome")),
    params_case("layer-out-of-range", r"layer\(s\) \[7\] out of range, the base model has layers 0\.\.3",
                edit__overrides={"layers": [1, 7]}, covariance__layers=[1, 7]),
    params_case("layer-negative", r"layers must be ≥ 0", edit__overrides={"layers": [-1, 1]}),
    params_case("lambda-zero", r"mom2_update_weight must be a finite number > 0, got 0",
                edit__overrides={"mom2_update_weight": 0}),
    params_case("lambda-negative", r"mom2_update_weight must be a finite number > 0, got -5",
                edit__overrides={"mom2_update_weight": -5}),
    params_case("nan-hparam", r"v_lr must be a finite number > 0, got nan", edit__overrides={"v_lr": float("nan")}),
    params_case("infinite-hparam", r"clamp_norm_factor must be a finite number > 0, got inf",
                edit__overrides={"clamp_norm_factor": float("inf")}),
    params_case("unknown-hparam", r"unknown hyper-parameter\(s\): learning_rate", edit__overrides={"learning_rate": 1}),
    params_case("wrong-type-hparam", r"v_num_grad_steps must be an integer ≥ 1, got 'ten'",
                edit__overrides={"v_num_grad_steps": "ten"}),
    params_case("unconfigured-covariance", r"edits attn_out@1, attn_out@2, but params\.yaml computes covariances only",
                args=("add", "--requests", "{good}", "--method", "pmet-attn-write")),
    params_case("unknown-engine", r"engine must be fast or reference, got 'slow'", edit__engine="slow"),
    params_case("unknown-params-key", r"unknown parameter 'colour'", colour="red"),
    params_case("params-not-yaml", r"params\.yaml is not valid YAML", text="edit: [unclosed\n"),
    params_case("guard-ratio-not-positive", r"guard\.max_ppl_ratio must be a finite number > 0 or null \(off\), got -1",
                guard__max_ppl_ratio=-1),
    # ---- the model
    params_case("model-directory-missing", r"is not a Hugging Face model directory \(no config\.json\)",
                args=("stage", "model"), model__path="/nonexistent/model"),
    model_dir_case("model-weights-missing", r"could not load the model at .*model", _weights_missing),
    model_dir_case("tokenizer-mismatch", r"the tokenizer has \d+ tokens but the model embeds only 64", _tokenizer_mismatch),
    params_case("unknown-dtype", r"unknown dtype 'float7'", args=("stage", "model"), model__dtype="float7"),
    Case("ledger-of-another-base-model", lambda repo, outside: ["materialize", "1", outside / "out"],
         r"base_model is not the ledger's base model", _other_base_model),
    # ---- ledger references and history
    Case("unknown-sequence-number", lambda repo, outside: ["show", "9"], r"no committed entry matches '9' \(the ledger "
         r"has entries 0001–0003\)"),
    Case("unknown-id-prefix", lambda repo, outside: ["revert", "abcdef12"], r"no committed entry matches 'abcdef12'"),
    Case("malformed-reference", lambda repo, outside: ["diff", "1", "x!"], r"'x!' is not an entry reference"),
    Case("revert-of-a-reverted-entry", lambda repo, outside: ["revert", "2"],
         r"entry 0002 .* was already reverted or dropped by entry 0003"),
    Case("revert-to-the-current-state", lambda repo, outside: ["revert", "3"], r"the active state already is the state"),
    Case("drop-of-an-inactive-entry", lambda repo, outside: ["drop", "2"], r"entry 0002 .* is not active"),
    Case("drop-of-a-revert", lambda repo, outside: ["drop", "3", "--fast"], r"only edit entries can be dropped"),
    Case("drop-of-base", lambda repo, outside: ["drop", "base"], r"'base' is not an entry here"),
    Case("materialize-into-a-non-empty-directory", lambda repo, outside: ["materialize", "1", outside],
         r"output directory .* exists and is not empty"),
    Case("apply-of-a-committed-batch", lambda repo, outside: ["stage", "apply", "--batch", _batch(repo, 1)],
         r"is already committed; the ledger never rewrites an entry"),
    Case("apply-outside-a-batch-directory", lambda repo, outside: ["stage", "apply", "--batch", repo / "data"],
         r"cannot read batch\.yaml"),
]


@pytest.fixture(scope="module")
def ledger_project(tmp_path_factory):
    return small_ledger(tmp_path_factory.mktemp("bad-input"))


def test_the_catalogue_is_large_and_distinct():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)) >= 25


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_is_refused_and_changes_nothing(ledger_project, case, tmp_path):
    repo = ledger_project.parent / f"case-{case.name}"  # a sibling: ../shared/data still resolves
    shutil.copytree(ledger_project, repo, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "something").write_text("x")
    if case.setup:
        case.setup(repo, outside)
    before = tree_digest(repo)
    res = cli(repo, *case.args(repo, outside), code=None)
    assert res.exit_code == 2, (res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert re.search(case.expect, lines[0]), lines[0]
    assert tree_digest(repo) == before


def test_a_second_writer_is_refused_and_changes_nothing(ledger_project, tmp_path):
    repo = ledger_project.parent / "case-locked"
    shutil.copytree(ledger_project, repo, symlinks=True)
    req = tmp_path / "req.json"
    req.write_text(json.dumps(COUNTERFACT_RECORDS[2:3]))
    with LedgerLock(repo / "ledger"):
        before = tree_digest(repo)
        for args in (["add", "--requests", req], ["revert", "1"], ["drop", "1"]):
            res = cli(repo, *args, code=2)
            assert res.stderr.strip() == (f"error: the ledger is locked by process {os.getpid()} (lock file "
                                          f"{repo / 'ledger' / '.lock'}); wait for it to finish (readers such as "
                                          "log/show/verify do not need the lock)")
        assert tree_digest(repo) == before

