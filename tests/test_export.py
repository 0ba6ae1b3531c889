"""Exports of ledger states (issue 22), on tiny models of every family: the factor math, PEFT adapters
and GGUF files read back by their own ecosystems (PeftModel, transformers' GGUF loader) against
``materialize``, determinism, refusals and atomicity.

Ledgers here hold low-rank deltas made up for the purpose (the exports only read what the ledger
stores); the real editor's deltas are exported in test_export_cli.py (tiny project) and
test_export_smollm2.py (SmolLM2).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import gguf
import pytest
import torch
import yaml
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import FAMILIES, make_model, tok_for
from pipeline.export import ExportError, ExportRequest, GgufSource, export, factor, prepare
from pipeline.export import run as export_run
from pipeline.export.lowrank import RankError
from pipeline.ledger import append_drop, append_edit, append_revert, materialize
from pipeline.models.adapters import adapter_for
from pipeline.models.loading import model_fingerprint
from test_ledger_support import fake_deltas

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
TEXT = "The capital of France is Paris, and Toko Yasuda plays the piano in Tokyo."
# tiny configs whose every setting GGUF metadata carries (transformers reads GPT-2 GGUF files with
# n_positions 1024 and n_inner 4·n_embd)
GGUF_FAMILIES = {"llama": {}, "gpt2": {"n_positions": 1024, "n_inner": None}}
BATCH_RANKS = (2, 3)


def lowrank_deltas(model, n: int, rank: int) -> dict[str, torch.Tensor]:
    """A batch's deltas on both output projections of layers 1 and 2, of rank ``rank`` at layer 1 and
    ``rank + 1`` at layer 2 (so the adapter's ranks differ per module), in each parameter's own
    layout (GPT-2's Conv1D: [in, out])."""
    adapter, params = adapter_for(model), dict(model.named_parameters())
    g = torch.Generator().manual_seed(100 + n)
    out = {}
    for layer in (1, 2):
        for role in ("mlp_out", "attn_out"):
            name = adapter.parameter_name(role, layer)
            rows, cols = params[name].shape
            r = rank + layer - 1
            out[name] = torch.randn(rows, r, generator=g) @ torch.randn(r, cols, generator=g) * (0.2 / r)
    return out


def requests(n: int) -> list[dict]:
    return [{"subject": f"Subject {n}", "prompt": "{} is located in", "target_new": f"Place {n}",
             "target_true": f"Home {n}", "case_id": n}]


class Tiny:
    """A tiny base model saved as a HF directory and a ledger on it: edits of rank 2 and 3 (entries
    1, 2), then whatever a test appends."""

    def __init__(self, tmp: Path, family: str, **overrides):
        self.family, self.base, self.tok = family, make_model(family, **overrides), tok_for(family)
        self.model_dir, self.ledger = tmp / "model", tmp / "ledger"
        self.base.save_pretrained(self.model_dir)
        self.tok.save_pretrained(self.model_dir)
        self.ledger.mkdir()
        self.fp = model_fingerprint(self.base)
        self.model = copy.deepcopy(self.base)
        for n, rank in enumerate(BATCH_RANKS, start=1):
            self.edit(n, lowrank_deltas(self.model, n, rank))

    def edit(self, n: int, deltas: dict[str, torch.Tensor]):
        return append_edit(self.ledger, self.fp, requests(n), "fake", {"layers": [1, 2]}, {}, deltas, model=self.model)

    def export(self, ref: str, fmt: str, out: Path, dtype: str = "f32", **kw) -> dict:
        req = ExportRequest(ref, fmt, out, dtype, **kw)
        target = prepare(self.ledger, req, self.base.config.model_type)
        return export(self.ledger, req, target, self.base, self.tok, GgufSource(None, self.model_dir), "data/model")

    def expected(self, ref: str):
        return materialize(self.ledger, None if ref == "head" else ref, self.base)

    def ids(self) -> torch.Tensor:
        return self.tok(TEXT, return_tensors="pt").input_ids


@torch.no_grad()
def max_logit_diff(a, b, ids) -> tuple[float, float]:
    la, lb = a(ids).logits.double(), b(ids).logits.double()
    return float((la - lb).abs().max()), float(la.abs().max())


def load_gguf(path: Path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


# ------------------------------------------------------------------------------------------------ factors

def test_factor_is_exact_up_to_float32_and_cuts_the_rounding_noise():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(40, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 70, generator=g, dtype=torch.float64)
    low = factor(exact.float())  # float32 storage adds full-rank rounding noise
    assert low.rank == 4 and low.a.shape == (4, 70) and low.b.shape == (40, 4)
    assert low.s_next < 1e-6 * low.s_max < low.tol  # the cut falls in a gap of many orders of magnitude
    assert low.residual < 1e-6
    assert torch.allclose(low.b.double() @ low.a.double(), exact, atol=1e-5 * float(exact.abs().max()))


def test_factor_refuses_a_full_rank_change_naming_the_rank():
    with pytest.raises(RankError, match=r"numerical rank is 8, the full rank of a 8×12 matrix") as err:
        factor(torch.randn(8, 12, generator=torch.Generator().manual_seed(1)))
    assert err.value.rank == 8


def test_factor_of_no_change_is_rank_zero():
    assert factor(torch.zeros(5, 7)).rank == 0


def test_factor_bits_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(2)
    d = (torch.randn(96, 6, generator=g) @ torch.randn(6, 160, generator=g)).double()
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(factor(d))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0].a, results[1].a) and torch.equal(results[0].b, results[1].b)
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------------------------ PEFT

@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_gives_the_logits_of_materialize(tmp_path, family):
    t = Tiny(tmp_path, family)
    report = t.export("2", "peft", tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(t.base), str(tmp_path / "adapter")).eval()
    diff, scale = max_logit_diff(peft_model, t.expected("2"), t.ids())
    assert diff <= 1e-5 * scale
    # the net change of two batches (rank 2 and 3 at layer 1, 3 and 4 at layer 2), found exactly
    assert sorted(m["rank"] for m in report["modules"].values()) == [5, 5, 7, 7]
    assert all(m["relative_residual"] < 1e-6 and m["s_first_cut"] < 1e-6 * m["s_max"] for m in report["modules"].values())
    assert report["lora_parameters"] < report["dense_parameters"] < report["model_parameters"]
    assert report["round_trip"]["max_abs_diff"] <= report["round_trip"]["tolerance"]


def test_peft_adapter_files_are_what_peft_reads_and_name_the_state(tmp_path):
    t = Tiny(tmp_path, "gpt2")  # Conv1D: weights stored [in, out]
    t.export("head", "peft", tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "editledger.json"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
    assert config["base_model_name_or_path"] == "data/model"
    assert config["rank_pattern"] == config["alpha_pattern"]  # scaling α/r = 1 per module
    head = t.ledger.joinpath(sorted(p.name for p in t.ledger.iterdir() if p.name[0].isdigit())[-1])
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    assert meta["editledger.entry_dir"] == head.name and meta["editledger.entry_id"] == json.loads(
        (head / "state.json").read_text())["id"]
    assert meta["editledger.base_fingerprint"] == t.fp
    assert meta["editledger.state_fingerprint"] == model_fingerprint(t.expected("head"))
    # [out, in] factors: GPT-2's c_proj of the MLP maps 64 → 32
    assert shapes["base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight"] == (5, 64)
    assert shapes["base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight"] == (32, 5)


def test_peft_export_of_an_approximate_state_after_a_fast_drop(tmp_path):
    t = Tiny(tmp_path, "llama")
    drop = append_drop(t.ledger, "1", "fast", base_model=t.base).entries[0]
    report = t.export(drop.id[:10], "peft", tmp_path / "adapter")
    assert report["approximate"] is True
    # W + a + b − a: the net change is b (rank 3 and 4) plus float32 rounding, which the tolerance cuts
    assert sorted(m["rank"] for m in report["modules"].values()) == [3, 3, 4, 4]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(t.base), str(tmp_path / "adapter")).eval()
    diff, scale = max_logit_diff(peft_model, t.expected(drop.id), t.ids())
    assert diff <= 1e-5 * scale


def test_peft_refuses_a_full_rank_change_naming_it_and_writes_nothing(tmp_path):
    t = Tiny(tmp_path, "llama")
    t.edit(3, fake_deltas(t.model, 3, params=("model.layers.0.mlp.down_proj.weight",)))  # random: full rank
    with pytest.raises(ExportError, match=r"full rank in 1 matrix\(es\): model\.layers\.0\.mlp\.down_proj\.weight "
                                          r"needs rank 32 \(full rank of 32×64\)"):
        t.export("3", "peft", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() and leftovers(tmp_path) == []
    t.export("2", "peft", tmp_path / "adapter")  # the state before it is still exportable


def test_peft_refuses_a_state_that_is_the_base_model_up_to_rounding(tmp_path):
    """Fast drops of every batch: ``W + a + b − a − b`` differs from ``W`` by float32 rounding only,
    a full-rank change far below the weights' resolution; it has rank 0, not full rank."""
    t = Tiny(tmp_path, "llama")
    append_drop(t.ledger, "1", "fast", base_model=t.base)
    append_drop(t.ledger, "2", "fast", base_model=t.base)
    assert not torch.equal(t.expected("head").model.layers[1].mlp.down_proj.weight,
                           t.base.model.layers[1].mlp.down_proj.weight)
    with pytest.raises(ExportError, match="has no weight change from the base model beyond float32 rounding"):
        t.export("head", "peft", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists() and leftovers(tmp_path) == []


def test_head_of_an_empty_ledger_names_nothing(tmp_path):
    (tmp_path / "ledger").mkdir()
    with pytest.raises(ExportError, match="the ledger has no committed entry: 'head' names nothing"):
        prepare(tmp_path / "ledger", ExportRequest("head", "gguf", tmp_path / "m.gguf"))


def test_peft_refuses_a_state_that_is_the_base_model(tmp_path):
    t = Tiny(tmp_path, "llama")
    rev = append_revert(t.ledger, "base")
    with pytest.raises(ExportError, match="is the base model: it changes no weight"):
        t.export(str(rev.seq), "peft", tmp_path / "adapter")
    with pytest.raises(ExportError, match="'base' is the unedited model"):
        t.export("base", "peft", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------------------------------------------ GGUF

@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_f32_read_by_transformers_gives_the_logits_of_materialize(tmp_path, family):
    t = Tiny(tmp_path, family, **GGUF_FAMILIES[family])
    report = t.export("2", "gguf", tmp_path / "edited.gguf")
    diff, scale = max_logit_diff(load_gguf(tmp_path / "edited.gguf"), t.expected("2"), t.ids())
    assert diff <= 1e-6 * scale  # the same float32 tensors: the same model
    assert report["round_trip"]["max_abs_diff"] == pytest.approx(diff, abs=1e-6 * scale)
    # the base tokenizer is carried: transformers builds the same tokenizer from the file
    read_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="edited.gguf")
    assert read_tok(TEXT).input_ids == t.tok(TEXT).input_ids
    fields = gguf.GGUFReader(tmp_path / "edited.gguf").fields
    assert fields["editledger.entry_dir"].contents().startswith("0002-")
    assert fields["editledger.base_fingerprint"].contents() == t.fp
    assert fields["editledger.state_fingerprint"].contents() == model_fingerprint(t.expected("2"))
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32


def test_gguf_llama_layout_is_llama_cpps(tmp_path):
    """Q/K rows in llama.cpp's interleaved rotary order (what convert_hf_to_gguf.py writes), ggml
    shapes [in, out], no output tensor for a tied head."""
    t = Tiny(tmp_path, "llama")
    t.export("1", "gguf", tmp_path / "edited.gguf")
    tensors = {x.name: x for x in gguf.GGUFReader(tmp_path / "edited.gguf").tensors}
    cfg, edited = t.base.config, dict(t.expected("1").named_parameters())
    q = edited["model.layers.0.self_attn.q_proj.weight"]
    n, half = cfg.num_attention_heads, q.shape[0] // cfg.num_attention_heads // 2
    llama_cpp = q.reshape(n, 2, half, -1).swapaxes(1, 2).reshape(q.shape)
    assert torch.equal(torch.from_numpy(tensors["blk.0.attn_q.weight"].data.copy()), llama_cpp)
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [cfg.intermediate_size, cfg.hidden_size]
    assert "output.weight" in tensors  # the tiny Llama's head is not tied ...
    g = Tiny(tmp_path / "gpt2", "gpt2", **GGUF_FAMILIES["gpt2"])
    g.export("1", "gguf", tmp_path / "gpt2.gguf")
    assert "output.weight" not in {x.name for x in gguf.GGUFReader(tmp_path / "gpt2.gguf").tensors}  # ... GPT-2's is


def test_gguf_f16_stores_matrices_in_float16_and_reads_back_as_rounded(tmp_path):
    t = Tiny(tmp_path, "llama")
    report = t.export("2", "gguf", tmp_path / "f16.gguf", dtype="f16")
    reader = gguf.GGUFReader(tmp_path / "f16.gguf")
    kinds = {x.name: x.tensor_type for x in reader.tensors}
    assert kinds["blk.1.ffn_down.weight"] == kinds["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert kinds["blk.1.attn_norm.weight"] == kinds["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    expected = t.expected("2")
    diff, scale = max_logit_diff(load_gguf(tmp_path / "f16.gguf"), expected, t.ids())
    assert 0 < diff <= 1e-2 * scale  # float16 storage, nothing worse
    assert report["round_trip"]["max_abs_diff"] <= report["round_trip"]["tolerance"]  # exact against the rounding
    assert 0 < report["round_trip"]["rounding_max_abs_diff"] <= 1e-2 * scale  # reported on the check's own text
    assert (tmp_path / "f16.gguf").stat().st_size < 0.6 * (t.export("2", "gguf", tmp_path / "f32.gguf")["bytes"])


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in GGUF_FAMILIES])
def test_gguf_refuses_families_transformers_cannot_read_back(tmp_path, family):
    t = Tiny(tmp_path, family)
    with pytest.raises(ExportError, match=rf"GGUF export supports the model families gpt2, llama, .*; not {family!r}: "
                                          "export it with --format peft"):
        t.export("2", "gguf", tmp_path / "edited.gguf")
    assert leftovers(tmp_path) == [] and not (tmp_path / "edited.gguf").exists()
    t.export("2", "peft", tmp_path / "adapter")  # the adapter is their export


def test_gguf_refuses_a_config_its_metadata_does_not_carry(tmp_path):
    t = Tiny(tmp_path, "gpt2")  # n_positions 256: GGUF's context length is read back as n_ctx, not n_positions
    with pytest.raises(ExportError, match=r"reads the GGUF export back as another model: transformer\.h\.0\.mlp\.c_fc"
                                          r"\.bias has shape \(128,\).*nothing was written"):
        t.export("2", "gguf", tmp_path / "edited.gguf")
    assert not (tmp_path / "edited.gguf").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ both

def test_exports_are_the_same_bytes_for_the_same_state(tmp_path):
    t = Tiny(tmp_path, "llama")
    before = torch.get_num_threads()
    outs = []
    try:
        for i, threads in enumerate((1, 2)):
            torch.set_num_threads(threads)
            t.export("2", "peft", tmp_path / f"adapter{i}")
            t.export("2", "gguf", tmp_path / f"m{i}.gguf")
            outs.append([(tmp_path / f"adapter{i}" / n).read_bytes() for n in sorted(p.name for p in
                                                                                   (tmp_path / f"adapter{i}").iterdir())]
                        + [(tmp_path / f"m{i}.gguf").read_bytes()])
    finally:
        torch.set_num_threads(before)
    assert outs[0] == outs[1]
    t.export("head", "gguf", tmp_path / "by-head.gguf")  # another reference to the same entry: the same bytes
    assert (tmp_path / "by-head.gguf").read_bytes() == outs[0][-1]
    t.export("1", "gguf", tmp_path / "other.gguf")
    assert (tmp_path / "other.gguf").read_bytes() != outs[0][-1]


def test_exports_never_overwrite(tmp_path):
    t = Tiny(tmp_path, "llama")
    (tmp_path / "taken.gguf").write_text("mine")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    with pytest.raises(ExportError, match="exists; choose a new path"):
        t.export("2", "gguf", tmp_path / "taken.gguf")
    with pytest.raises(ExportError, match="exists and is not an empty directory"):
        t.export("2", "peft", tmp_path / "taken")
    assert (tmp_path / "taken.gguf").read_text() == "mine" and (tmp_path / "taken" / "file").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    t.export("2", "peft", tmp_path / "empty")  # an empty directory may receive the adapter, as with materialize
    assert (tmp_path / "empty" / "adapter_config.json").exists()


@pytest.mark.parametrize("fmt,out", [("peft", "adapter"), ("gguf", "edited.gguf")])
def test_a_failed_read_back_leaves_nothing(tmp_path, monkeypatch, fmt, out):
    t = Tiny(tmp_path, "llama")

    def wrong(reader, expected, got):
        raise ExportError(f"read back with {reader}, the export gives other logits")

    monkeypatch.setattr(export_run.roundtrip, "compare", wrong)
    with pytest.raises(ExportError, match="other logits"):
        t.export("2", fmt, tmp_path / out)
    assert not (tmp_path / out).exists() and leftovers(tmp_path) == []
    monkeypatch.undo()
    t.export("2", fmt, tmp_path / out, check=False)  # --no-check writes without reading back
    assert (tmp_path / out).exists()


def test_carried_metadata_must_describe_the_model(tmp_path):
    """A packaged GGUF is carried over only onto the model it describes (here: SmolLM2's file and a
    tiny Llama, same architecture, other hyper-parameters)."""
    from pipeline.models.loading import find_default_gguf

    t = Tiny(tmp_path, "llama")
    req = ExportRequest("2", "gguf", tmp_path / "edited.gguf")
    target = prepare(t.ledger, req, "llama")
    with pytest.raises(ExportError, match=r"does not describe this base model: llama\.context_length is 8192 there, "
                                          r"256 in the model's config"):
        export(t.ledger, req, target, t.base, t.tok, GgufSource(find_default_gguf(), t.model_dir))
    assert not (tmp_path / "edited.gguf").exists() and leftovers(tmp_path) == []


def test_gguf_of_a_hf_base_needs_its_tokenizer_json(tmp_path):
    t = Tiny(tmp_path, "llama")
    req = ExportRequest("2", "gguf", tmp_path / "edited.gguf")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ExportError, match=r"elsewhere: no byte-level BPE tokenizer\.json"):
        export(t.ledger, req, prepare(t.ledger, req), t.base, t.tok, GgufSource(None, tmp_path / "elsewhere"))
    assert not (tmp_path / "edited.gguf").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("section,expect", [
    ({"formats": ["onnx"]}, r"export\.formats must be a list of distinct formats out of peft, gguf"),
    ({"formats": ["peft", "peft"]}, r"export\.formats must be a list of distinct formats"),
    ({"gguf_dtype": "q4"}, r"export\.gguf_dtype must be one of f32, f16"),
    ({"peft_rtol": "1e-4"}, r"export\.peft_rtol must be a number in \(0, 1\).*write 1\.0e-4"),
    ({"peft_rtol": 2.0}, r"export\.peft_rtol must be a number in \(0, 1\)"),
    ({"entry": True}, r"export\.entry must be an entry reference or head"),
])
def test_params_export_section_is_checked(tmp_path, section, expect):
    from pipeline.config import ParamsError, load_params

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"export": section}))
    with pytest.raises(ParamsError, match=expect):
        load_params(tmp_path / "params.yaml")
