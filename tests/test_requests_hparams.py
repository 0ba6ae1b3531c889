"""Request parsing / validation, hyper-parameter validation and method lookup."""

from __future__ import annotations

import copy
import json
import math

import pytest

from conftest import COUNTERFACT_RECORDS
from pipeline.editing.hparams import HParams, HParamsError, load_hparams
from pipeline.editing.methods import METHODS, MethodError, get_method
from pipeline.requests import (
    EditRequest,
    RequestError,
    load_requests,
    parse_record,
    parse_requests,
    requests_hash,
    validate_batch,
)

ZSRE = {
    "subject": "Life Electric",
    "src": "The designer for Life Electric was?",
    "pred": "Kimball & Thompson",
    "rephrase": "What architect did Life Electric design?",
    "alt": "Mitsumasa Anno",
    "answers": ["Daniel Libeskind"],
    "loc": "nq question: most consecutive games with 20+ points - nba history",
    "loc_ans": "126",
    "case_id": 7,
}

PLAIN = {"subject": "Rome", "prompt": "{} is the capital of", "target_new": "France", "target_true": "Italy"}


def cf(**rewrite):
    rec = copy.deepcopy(COUNTERFACT_RECORDS[0])
    rec["requested_rewrite"].update(rewrite)
    return rec


# ------------------------------------------------------------------------------------ parsing
def test_parse_counterfact():
    req = parse_record(copy.deepcopy(COUNTERFACT_RECORDS[0]))
    assert req == EditRequest(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English",
                              target_true="French", case_id=0, relation_id="P103", fmt="counterfact")
    assert req.text == "The mother tongue of Danielle Darrieux is"
    assert req.record["paraphrase_prompts"]  # the source record is kept for evaluation


def test_parse_zsre():
    req = parse_record(copy.deepcopy(ZSRE))
    assert req.fmt == "zsre"
    assert req.prompt == "The designer for {} was?"
    assert req.text == ZSRE["src"]
    assert req.target_new == "Mitsumasa Anno" and req.target_true == "Daniel Libeskind"
    assert req.case_id == 7


def test_parse_plain():
    req = parse_record(dict(PLAIN))
    assert req.fmt == "plain"
    assert (req.subject, req.prompt, req.target_new, req.target_true) == ("Rome", "{} is the capital of", "France", "Italy")
    req = parse_record({"subject": "Rome", "prompt": "{} is in", "target_new": {"str": "Asia"}})
    assert req.target_new == "Asia" and req.target_true is None


def test_parse_requests_mixed_list_and_hash_is_stable():
    reqs = parse_requests([copy.deepcopy(COUNTERFACT_RECORDS[0]), copy.deepcopy(ZSRE), dict(PLAIN)])
    assert [r.fmt for r in reqs] == ["counterfact", "zsre", "plain"]
    again = parse_requests([copy.deepcopy(COUNTERFACT_RECORDS[0]), copy.deepcopy(ZSRE), dict(PLAIN)])
    assert requests_hash(reqs) == requests_hash(again)
    assert requests_hash(reqs) != requests_hash(again[::-1])


def test_load_requests(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(copy.deepcopy(COUNTERFACT_RECORDS)), encoding="utf-8")
    reqs = load_requests(p)
    assert [r.subject for r in reqs] == [r["requested_rewrite"]["subject"] for r in COUNTERFACT_RECORDS]


# ------------------------------------------------------------------------------------ rejections
def test_malformed_json_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"subject": "x",\n "prompt": }]', encoding="utf-8")
    with pytest.raises(RequestError, match=r"malformed JSON at line 2"):
        load_requests(p)


def test_missing_file(tmp_path):
    with pytest.raises(RequestError, match="cannot read requests file"):
        load_requests(tmp_path / "nope.json")


def test_not_a_list(tmp_path):
    p = tmp_path / "obj.json"
    p.write_text(json.dumps(dict(PLAIN)), encoding="utf-8")
    with pytest.raises(RequestError, match="expected a JSON list of requests, got dict"):
        load_requests(p)
    with pytest.raises(RequestError, match="expected a JSON object, got str"):
        parse_requests(["just a string"])


@pytest.mark.parametrize(
    "record,message",
    [
        ({**PLAIN, "subject": None} | {}, "request 0: field 'subject' must be a string"),
        ({k: v for k, v in PLAIN.items() if k != "subject"}, "request 0: missing field 'subject'"),
        ({k: v for k, v in PLAIN.items() if k != "target_new"}, "request 0: missing field 'target_new'"),
        ({**PLAIN, "prompt": "Rome is the capital of"}, r"placeholder '\{\}' exactly once, found 0"),
        ({**PLAIN, "prompt": "{} and {} are"}, r"placeholder '\{\}' exactly once, found 2"),
        ({**PLAIN, "target_new": ""}, "empty target_new"),
        ({**PLAIN, "target_new": "   "}, "empty target_new"),
        ({**PLAIN, "target_new": {"id": "Q1"}}, "target_new has no 'str'"),
        ({**PLAIN, "target_new": "Italy"}, "target_new equals target_true"),
        ({**PLAIN, "target_new": " Italy "}, "target_new equals target_true"),
        ({**PLAIN, "subject": "  "}, "empty subject"),
        ({"foo": 1}, "unrecognised format"),
    ],
)
def test_plain_rejections(record, message):
    with pytest.raises(RequestError, match=message):
        parse_requests([record])


def test_counterfact_rejections():
    rec = copy.deepcopy(COUNTERFACT_RECORDS[0])
    del rec["requested_rewrite"]["subject"]
    with pytest.raises(RequestError, match="missing field 'subject'"):
        parse_record(rec)
    rec = copy.deepcopy(COUNTERFACT_RECORDS[0])
    del rec["requested_rewrite"]["target_new"]
    with pytest.raises(RequestError, match="missing field 'target_new'"):
        parse_record(rec)
    with pytest.raises(RequestError, match="exactly once, found 0"):
        parse_record(cf(prompt="The mother tongue is"))
    with pytest.raises(RequestError, match="exactly once, found 2"):
        parse_record(cf(prompt="{} and {}"))
    with pytest.raises(RequestError, match="empty target_new"):
        parse_record(cf(target_new={"str": " "}))
    with pytest.raises(RequestError, match="target_new equals target_true"):
        parse_record(cf(target_new={"str": "French"}))
    with pytest.raises(RequestError, match="'requested_rewrite' must be an object"):
        parse_record({"requested_rewrite": "x"})


def test_errors_name_the_request_index():
    records = [dict(PLAIN), {**PLAIN, "subject": "Paris", "prompt": "no placeholder"}]
    with pytest.raises(RequestError, match="^request 1:"):
        parse_requests(records)


def test_zsre_subject_not_in_src():
    with pytest.raises(RequestError, match="subject 'Life Electric' not found in the prompt"):
        parse_record({**ZSRE, "src": "Who designed the tower?"})


def test_zsre_empty_target():
    with pytest.raises(RequestError, match="empty target_new"):
        parse_record({**ZSRE, "alt": ""})


def test_zsre_target_equals_answer():
    with pytest.raises(RequestError, match="target_new equals target_true"):
        parse_record({**ZSRE, "alt": "Daniel Libeskind"})


def test_duplicate_requests():
    with pytest.raises(RequestError, match="request 1: duplicate of request 0"):
        parse_requests([dict(PLAIN), dict(PLAIN)])


def test_conflicting_requests():
    other = {**PLAIN, "target_new": "Spain"}
    with pytest.raises(RequestError, match="request 1: conflicts with request 0.*'Spain' vs 'France'"):
        parse_requests([dict(PLAIN), other])


def test_same_subject_different_prompt_is_fine():
    reqs = parse_requests([dict(PLAIN), {**PLAIN, "prompt": "{} is located in", "target_new": "Sweden"}])
    assert len(reqs) == 2


def test_empty_batch():
    with pytest.raises(RequestError, match="the batch holds no requests"):
        parse_requests([])
    with pytest.raises(RequestError, match="no requests"):
        validate_batch([])


# ------------------------------------------------------------------------------------ hparams
def test_hparams_defaults_valid():
    hp = HParams(layers=(1, 2, 3))
    assert hp.layers == (1, 2, 3)
    assert HParams.from_dict(hp.to_dict()) == hp
    assert hp.replace(v_lr=0.1).v_lr == 0.1


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"bogus": 1}, "unknown hyper-parameter"),
        ({"layers": [3, 2]}, "strictly increasing"),
        ({"layers": [2, 2]}, "strictly increasing"),
        ({"layers": []}, "non-empty"),
        ({"layers": [-1, 0]}, "≥ 0"),
        ({"layers": [1.0, 2.0]}, "integers"),
        ({"mom2_update_weight": 0}, "mom2_update_weight must be a finite number > 0"),
        ({"mom2_update_weight": -5.0}, "mom2_update_weight"),
        ({"v_lr": float("nan")}, "v_lr must be a finite number"),
        ({"v_lr": float("inf")}, "v_lr must be a finite number"),
        ({"clamp_norm_factor": True}, "clamp_norm_factor"),
        ({"kl_factor": -0.1}, "kl_factor must be a finite number ≥ 0"),
        ({"v_num_grad_steps": 2.5}, "v_num_grad_steps must be an integer ≥ 1"),
        ({"v_num_grad_steps": 0}, "v_num_grad_steps must be an integer ≥ 1"),
        ({"v_num_grad_steps": "10"}, "v_num_grad_steps must be an integer"),
        ({"nll_weight_after_argmax": 0}, "nll_weight_after_argmax"),
        ({"cov_max_texts": -1}, "cov_max_texts"),
    ],
)
def test_hparams_rejections(changes, message):
    data = {**HParams(layers=(1, 2)).to_dict(), **changes}
    with pytest.raises(HParamsError, match=message):
        HParams.from_dict(data)


def test_hparams_need_layers():
    with pytest.raises(HParamsError, match="need 'layers'"):
        HParams.from_dict({"v_lr": 0.1})


def test_hparams_direct_construction_validates():
    with pytest.raises(HParamsError):
        HParams(layers=(2, 1))
    with pytest.raises(HParamsError):
        HParams(layers=(1,), mom2_update_weight=math.inf)


def test_load_bundled_hparams():
    hp = load_hparams("smollm2-135m-instruct", "pmet")
    assert isinstance(hp, HParams)
    assert hp.layers == (1, 2, 3, 4, 5)
    assert hp.kl_factor == 1.0 and hp.nll_weight_after_argmax == 0.1
    memit = load_hparams("smollm2-135m-instruct", "memit")
    assert memit.kl_factor == 0.0625 and memit.nll_weight_after_argmax is None
    assert load_hparams("smollm2-135m-instruct", "pmet", {"v_lr": 0.1}).v_lr == 0.1


def test_every_method_has_a_bundled_section():
    for m in METHODS.values():
        load_hparams("smollm2-135m-instruct", m.hparams_from)


def test_load_hparams_errors(tmp_path):
    with pytest.raises(HParamsError, match="no section for method 'rome'"):
        load_hparams("smollm2-135m-instruct", "rome")
    with pytest.raises(HParamsError, match="no bundled hyper-parameters named 'gpt-9'"):
        load_hparams("gpt-9", "pmet")
    with pytest.raises(HParamsError, match="does not exist"):
        load_hparams(tmp_path / "missing.yaml", "pmet")
    p = tmp_path / "h.yaml"
    p.write_text("defaults:\n  layers: [1, 2]\nmethods:\n  pmet:\n    v_lr: .nan\n")
    with pytest.raises(HParamsError, match="v_lr"):
        load_hparams(p, "pmet")
    p.write_text("defaults:\n  layers: [1, 2]\nmethods:\n  pmet:\n    learning_rate: 0.1\n")
    with pytest.raises(HParamsError, match="unknown hyper-parameter.*learning_rate"):
        load_hparams(p, "pmet")


# ------------------------------------------------------------------------------------ methods
def test_get_method_unknown_lists_names():
    with pytest.raises(MethodError) as exc:
        get_method("nope")
    for name in ("memit", "pmet", "pmet-mlp-only", "pmet-attn-write", "pmet-even"):
        assert name in str(exc.value)
    assert "'nope'" in str(exc.value)


def test_method_specs():
    (memit,), (pmet,) = get_method("memit").regions, get_method("pmet").regions
    assert memit.sites == ("residual",) and memit.spread == "even" and memit.position == "subject"
    assert pmet.sites == ("attn", "mlp") and pmet.spread == "sqrt"
    assert pmet.writes == (("mlp_out", "mlp"),)
    assert get_method("pmet-mlp-only").sites == ("mlp",)
    assert set(get_method("pmet-attn-write").regions[0].writes) == {("attn_out", "attn"), ("mlp_out", "mlp")}
    assert get_method("pmet-even").regions[0].spread == "even"
    assert [r.name for r in get_method("jeep").regions] == ["low", "high"]


def test_method_spec_validation():
    from pipeline.editing.methods import Method, RegionSpec

    def one(sites, writes, spread="even", position="subject"):
        return Method("x", (RegionSpec("low", position, sites, writes, spread),), "pmet", "")

    with pytest.raises(MethodError, match="cannot optimise"):
        one(("ffn",), ())
    with pytest.raises(MethodError, match="cannot optimise"):
        one(("pred_mlp",), (("mlp_out", "pred_mlp"),))  # a prediction-token site at the subject
    with pytest.raises(MethodError, match="unknown spread"):
        one(("mlp",), (("mlp_out", "mlp"),), "linear")
    with pytest.raises(MethodError, match="cannot write"):
        one(("mlp",), (("attn_out", "attn"),))
    with pytest.raises(MethodError, match="writes nothing"):
        one(("mlp",), ())
