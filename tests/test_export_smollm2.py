"""Exports of a real edit of the default model, SmolLM2-135M-Instruct (issue 22).

One MEMIT batch of three CounterFact requests (a short covariance and optimisation keep it fast;
the method, model and code path are the real ones) in a ledger, exported as a PEFT adapter and as
GGUF files whose metadata is carried over from the packaged GGUF the base model was dequantised
from.  Each export is read back by its own ecosystem and compared with ``materialize``.
"""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pipeline import edit, load_hparams, parse_requests
from pipeline.data import sample_records
from pipeline.export import ExportRequest, GgufSource, export, prepare
from pipeline.ledger import append_edit, materialize
from pipeline.models.loading import find_default_gguf, load_model

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")]
FAST = {"cov_max_texts": 50, "v_dtype": "float32", "cov_dtype": "float32", "v_num_grad_steps": 10}
TEXT = "Danielle Darrieux's mother tongue is"


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export-smollm2")
    lm = load_model()
    records = sample_records("counterfact", 0, 3)
    hp = load_hparams("smollm2-135m-instruct", "memit", FAST)
    res = edit(lm.model, lm.tokenizer, parse_requests(records), method="memit", hparams=hp, cache_dir=tmp / "cov",
               fingerprint=lm.fingerprint, progress=False)
    append_edit(tmp / "ledger", lm.fingerprint, parse_requests(records), "memit", hp, res.covariance_ids, res.deltas,
                model=copy.deepcopy(lm.model))
    return tmp, lm, materialize(tmp / "ledger", "1", lm.model)


def _export(tmp, lm, fmt: str, name: str, dtype: str = "f32", check: bool = True) -> dict:
    req = ExportRequest("1", fmt, tmp / name, dtype, check=check)
    target = prepare(tmp / "ledger", req, "llama")
    return export(tmp / "ledger", req, target, lm.model, lm.tokenizer, GgufSource(find_default_gguf(), lm.path),
                  "HuggingFaceTB/SmolLM2-135M-Instruct (dequantised Q4_1)")


@torch.no_grad()
def _diff(model, reference, ids) -> tuple[float, float]:
    a, b = model.eval()(ids).logits.double(), reference(ids).logits.double()
    return float((a - b).abs().max()), float(b.abs().max())


def test_peft_adapter_of_a_real_edit(ledger):
    tmp, lm, edited = ledger
    report = _export(tmp, lm, "peft", "adapter")
    assert [m["rank"] for m in report["modules"].values()] == [3] * 5  # 3 requests, 5 layers
    assert all(m["s_first_cut"] < 1e-5 * m["s_max"] for m in report["modules"].values())  # a clean cut
    assert report["bytes"] < 0.002 * 4 * report["model_parameters"]  # under 0.2 % of the float32 model
    ids = lm.tokenizer(TEXT, return_tensors="pt").input_ids
    diff, scale = _diff(PeftModel.from_pretrained(copy.deepcopy(lm.model), str(tmp / "adapter")), edited, ids)
    assert diff <= 1e-5 * scale
    assert _diff(lm.model, edited, ids)[0] > 100 * diff  # the edit itself is far above that


def test_gguf_of_a_real_edit_carries_the_base_metadata(ledger):
    tmp, lm, edited = ledger
    report = _export(tmp, lm, "gguf", "edited.gguf")
    assert report["metadata"] == f"carried over from {find_default_gguf().name}"
    ids = lm.tokenizer(TEXT, return_tensors="pt").input_ids
    read = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file="edited.gguf", dtype=torch.float32)
    diff, scale = _diff(read, edited, ids)
    assert diff <= 1e-6 * scale
    source_file, our_file = gguf.GGUFReader(find_default_gguf()), gguf.GGUFReader(tmp / "edited.gguf")
    # the layout is the packaged file's: unedited tensors are its dequantised values, bit for bit (the
    # Q/K rows in llama.cpp's rotary order again, after transformers' loader reversed it for the base)
    theirs, written = ({t.name: t for t in f.tensors} for f in (source_file, our_file))
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight", "token_embd.weight"):
        t = theirs[name]
        assert np.array_equal(gguf.dequantize(t.data, t.tensor_type), written[name].data), name
    assert not np.array_equal(gguf.dequantize(theirs["blk.3.ffn_down.weight"].data, theirs["blk.3.ffn_down.weight"]
                                              .tensor_type), written["blk.3.ffn_down.weight"].data)  # edited
    source, ours = source_file.fields, our_file.fields
    skip = {"general.file_type", "general.quantization_version"}
    carried = {k for k in source if not k.startswith("GGUF.") and k not in skip}
    assert all(ours[k].contents() == source[k].contents() for k in carried)  # tokenizer, chat template, ...
    assert {k for k in ours if k.startswith("editledger.")} == {f"editledger.{k}" for k in (
        "entry_id", "entry_dir", "base_fingerprint", "state_fingerprint", "approximate")}
    assert ours["editledger.base_fingerprint"].contents() == lm.fingerprint


def test_gguf_f16_of_a_real_edit_stores_the_f32_export_rounded(ledger):
    """Written without the read-back (``check=False``; transformers' GGUF loader takes ~15 s for
    SmolLM2's vocabulary, and the f16 read-back is tested on the tiny models): the matrices are the
    float32 export's, rounded to float16, and the file is half the size."""
    tmp, lm, _ = ledger
    if not (tmp / "edited.gguf").exists():
        _export(tmp, lm, "gguf", "edited.gguf")
    report = _export(tmp, lm, "gguf", "edited-f16.gguf", "f16", check=False)
    assert "round_trip" not in report
    f32 = {t.name: t for t in gguf.GGUFReader(tmp / "edited.gguf").tensors}
    f16 = {t.name: t for t in gguf.GGUFReader(tmp / "edited-f16.gguf").tensors}
    assert f16.keys() == f32.keys()
    for name in ("blk.3.ffn_down.weight", "blk.0.attn_q.weight", "token_embd.weight", "blk.3.ffn_norm.weight"):
        stored = f16[name].data
        assert stored.dtype == (np.float16 if f32[name].data.ndim == 2 else np.float32)
        assert np.array_equal(stored, f32[name].data.astype(stored.dtype))
    assert (tmp / "edited-f16.gguf").stat().st_size < 0.55 * (tmp / "edited.gguf").stat().st_size
