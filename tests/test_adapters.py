"""Family adapters and forward hooks on tiny random models of every supported family."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import HIDDEN, INTER, N_LAYERS, make_model
from pipeline.editing.hooks import (
    StopForward,
    add_at,
    edit_output,
    hooks,
    record_input,
    record_output,
    run_truncated,
    stop_after,
)
from pipeline.models.adapters import AdapterError, adapter_for
from pipeline.models.loading import model_fingerprint

PROMPT = "The mother tongue of Danielle Darrieux is"


def _ids(tok, text=PROMPT, n=2):
    """A batch of ``n`` copies (rows differ only by batch index: exercises batched indexing)."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    return ids.repeat(n, 1)


def _mlp_key(family: str, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input of the MLP output projection, computed by hand from the MLP's input."""
    if family in ("llama", "gemma3_text"):
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    if family == "gpt2":
        return mlp.act(mlp.c_fc(x))
    if family == "gptj":
        return mlp.act(mlp.fc_in(x))
    if family == "gpt_neox":
        return mlp.act(mlp.dense_h_to_4h(x))
    raise AssertionError(family)


def _mlp_input(family: str, block: nn.Module, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """What the block's MLP reads, given the block input ``h`` and the attention output projection's output."""
    if family == "llama":
        return block.post_attention_layernorm(h + attn_out)
    if family == "gemma3_text":
        return block.pre_feedforward_layernorm(h + block.post_attention_layernorm(attn_out))
    if family == "gpt2":
        return block.ln_2(h + attn_out)
    if family == "gptj":
        return block.ln_1(h)  # parallel: attention and MLP read the same normed input
    if family == "gpt_neox":
        return block.post_attention_layernorm(h)  # parallel: a separate norm of the block input
    raise AssertionError(family)


def _block_output(family: str, block: nn.Module, h, attn_out, mlp_out):
    if family == "gemma3_text":
        return h + block.post_attention_layernorm(attn_out) + block.post_feedforward_layernorm(mlp_out)
    return h + attn_out + mlp_out


# ------------------------------------------------------------------------------------ adapter_for
def test_adapter_for_every_family(family_model):
    family, model, _ = family_model
    adapter = adapter_for(model)
    assert adapter.family == family
    assert adapter.num_layers(model) == N_LAYERS
    assert adapter.transposed == (family == "gpt2")
    assert (adapter.mlp_post_norm is not None) == (family == "gemma3_text")
    for layer in range(N_LAYERS):
        name = adapter.parameter_name("mlp_out", layer)
        assert name in dict(model.named_parameters())
        assert adapter.module(model, "mlp_out", layer) is model.get_submodule(name[: -len(".weight")])


def test_unknown_model_type_raises():
    fake = nn.Linear(2, 2)
    fake.config = SimpleNamespace(model_type="bert")
    with pytest.raises(AdapterError, match="no adapter for model_type 'bert'"):
        adapter_for(fake)
    fake.config = SimpleNamespace()
    with pytest.raises(AdapterError, match="None"):
        adapter_for(fake)


def test_model_that_does_not_match_its_family_raises():
    model = make_model("gpt2")
    model.config.model_type = "llama"  # a GPT-2 module tree claiming to be Llama
    with pytest.raises(AdapterError, match="not found"):
        adapter_for(model)


@pytest.mark.parametrize("layer", [N_LAYERS, -1, 100, True, 1.0, "1"])
def test_check_layer_out_of_range(llama, layer):
    model, _ = llama
    adapter = adapter_for(model)
    with pytest.raises(AdapterError, match="out of range"):
        adapter.check_layer(model, layer)


def test_check_layer_in_range(llama):
    model, _ = llama
    adapter = adapter_for(model)
    for layer in range(N_LAYERS):
        adapter.check_layer(model, layer)  # no error


def test_role_without_layer_raises(llama):
    model, _ = llama
    with pytest.raises(AdapterError, match="needs a layer"):
        adapter_for(model).path("mlp_out")
    with pytest.raises(AdapterError, match="no role"):
        adapter_for(model).path("mlp_post_norm", 0)


# ------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("role,shape", [("mlp_out", (HIDDEN, INTER)), ("attn_out", (HIDDEN, HIDDEN))])
def test_weight_is_out_in_view_sharing_storage(family_model, role, shape):
    family, model, _ = family_model
    adapter = adapter_for(model)
    layer = 1
    param = adapter.module(model, role, layer).weight
    w = adapter.weight(model, role, layer)
    assert tuple(w.shape) == shape
    assert adapter.in_out_dims(model, role, layer) == (shape[1], shape[0])
    assert w.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
    if family == "gpt2":
        assert tuple(param.shape) == (shape[1], shape[0])  # Conv1D stores [in, out]
    else:
        assert tuple(param.shape) == shape
    before = param.detach().clone()
    with torch.no_grad():
        w[2, 3] += 1.0  # write through the [out, in] view
    changed = (param.detach() != before).nonzero().tolist()
    assert changed == ([[3, 2]] if family == "gpt2" else [[2, 3]])
    # a full [out, in] update added through the view (as the spread adds it) lands where the view says
    delta = torch.randn(shape)
    with torch.no_grad():
        w.add_(delta)
    expected = (before.T if family == "gpt2" else before).clone()
    expected[2, 3] += 1.0
    expected += delta
    torch.testing.assert_close(adapter.weight(model, role, layer).detach(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=0)  # the earlier view is live


@pytest.mark.parametrize("role", ["mlp_out", "attn_out"])
def test_weight_orientation_matches_module_forward(family_model, role):
    """module(x) == x Wᵀ + b with W = adapter.weight (catches a missing / extra transpose)."""
    _, model, _ = family_model
    adapter = adapter_for(model)
    module = adapter.module(model, role, 2)
    w = adapter.weight(model, role, 2)
    x = torch.randn(3, 5, w.shape[1])
    bias = getattr(module, "bias", None)
    torch.testing.assert_close(module(x), F.linear(x, w, bias), atol=1e-5, rtol=1e-5)


def test_logits_match_the_model(family_model):
    family, model, tok = family_model
    if family == "gemma3_text":
        model.config.final_logit_softcapping = 0.5  # small cap so that it visibly matters
    adapter = adapter_for(model)
    ids = _ids(tok)
    with torch.no_grad():
        hidden = adapter.module(model, "backbone")(input_ids=ids).last_hidden_state
        ours = adapter.logits(model, hidden)
        theirs = model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    if family == "gemma3_text":
        assert ours.abs().max() <= 0.5


# ------------------------------------------------------------------------------------ hooks: reading
@pytest.mark.parametrize("layer", [0, 2])
def test_recorded_tensors_match_independent_computation(family_model, layer):
    """Key (mlp_out input), attention output and MLP output recorded by the hooks agree with a
    by-hand recomputation of the block from its input (output_hidden_states)."""
    family, model, tok = family_model
    adapter = adapter_for(model)
    ids = _ids(tok)
    store: dict = {}
    regs = [
        record_input(adapter.module(model, "mlp_out", layer), store, "key"),
        record_output(adapter.module(model, "mlp_out", layer), store, "mlp"),
        record_output(adapter.module(model, "attn_out", layer), store, "attn"),
        record_output(adapter.module(model, "block", layer), store, "block"),
    ]
    with torch.no_grad(), hooks(regs):
        out = model(input_ids=ids, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == N_LAYERS + 1
    h_in = out.hidden_states[layer]
    h_out = out.hidden_states[layer + 1]
    block = adapter.module(model, "block", layer)
    mlp = model.get_submodule(adapter.path("mlp_out", layer).rsplit(".", 1)[0])
    with torch.no_grad():
        x = _mlp_input(family, block, h_in, store["attn"])
        key = _mlp_key(family, mlp, x)
        mlp_out = adapter.module(model, "mlp_out", layer)(store["key"])
    assert store["key"].shape == (*ids.shape, INTER)
    torch.testing.assert_close(store["key"], key, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(store["mlp"], mlp_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(store["block"], h_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(store["block"], _block_output(family, block, h_in, store["attn"], store["mlp"]),
                               atol=1e-5, rtol=1e-4)


def test_hooks_are_removed_even_on_error(llama):
    model, tok = llama
    adapter = adapter_for(model)
    module = adapter.module(model, "mlp_out", 1)
    block = adapter.module(model, "block", 1)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks([record_input(module, {}, "k"), stop_after(block)]):
            assert len(module._forward_pre_hooks) == 1 and len(block._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(module._forward_pre_hooks) == 0 and len(block._forward_hooks) == 0
    with torch.no_grad():
        model(input_ids=_ids(tok))  # no StopForward leaks out afterwards


# ------------------------------------------------------------------------------------ hooks: writing
def test_add_at_only_touches_given_positions():
    t = torch.zeros(2, 4, 3)
    d = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 1
    out = add_at(torch.tensor([0, 1]), torch.tensor([2, 0]), d)(t)
    expected = torch.zeros(2, 4, 3)
    expected[0, 2] = d[0]
    expected[1, 0] = d[1]
    assert torch.equal(out, expected)
    assert torch.equal(t, torch.zeros(2, 4, 3))  # not in place
    # repeated coordinates accumulate
    out = add_at(torch.tensor([0, 0]), torch.tensor([1, 1]), d)(t)
    assert torch.equal(out[0, 1], d[0] + d[1])
    # differentiable w.r.t. delta
    d.requires_grad_(True)
    add_at(torch.tensor([0]), torch.tensor([3]), d[:1])(t).sum().backward()
    assert torch.equal(d.grad, torch.tensor([[1.0, 1, 1], [0, 0, 0]]))


@pytest.mark.parametrize("role", ["block", "attn_out", "mlp_out"])
def test_edit_output_is_causal(family_model, role):
    """Adding a vector at position p changes the final logits at positions ≥ p only."""
    _, model, tok = family_model
    adapter = adapter_for(model)
    ids = _ids(tok, n=1)
    pos = 4
    delta = torch.randn(1, HIDDEN) * 3
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with hooks([edit_output(adapter.module(model, role, 1), add_at(torch.tensor([0]), torch.tensor([pos]), delta))]):
            edited = model(input_ids=ids).logits
    torch.testing.assert_close(edited[:, :pos], base[:, :pos], atol=1e-6, rtol=0)
    diff = (edited - base).abs().amax(-1)[0]
    assert (diff[pos:] > 1e-4).all(), diff


@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj", "gpt_neox"])
def test_mlp_site_delta_reaches_block_output_exactly(model_factory, family):
    """On blocks whose MLP output is added to the residual unnormed, δ on mlp_out's output changes
    that block's output by exactly δ at that position and nowhere else."""
    model, tok = model_factory(family)
    adapter = adapter_for(model)
    ids = _ids(tok, n=2)
    layer, pos = 2, 3
    delta = torch.randn(1, HIDDEN)
    store0, store1 = {}, {}
    block = adapter.module(model, "block", layer)
    with torch.no_grad():
        with hooks([record_output(block, store0, "h")]):
            model(input_ids=ids)
        with hooks([record_output(block, store1, "h"),
                    edit_output(adapter.module(model, "mlp_out", layer), add_at(torch.tensor([1]), torch.tensor([pos]), delta))]):
            model(input_ids=ids)
    change = store1["h"] - store0["h"]
    torch.testing.assert_close(change[1, pos], delta[0], atol=1e-6, rtol=1e-5)
    mask = torch.ones(change.shape[:2], dtype=torch.bool)
    mask[1, pos] = False
    assert torch.equal(store1["h"][mask], store0["h"][mask])


def test_gemma_mlp_site_delta_goes_through_post_norm(gemma3):
    """Gemma normalises the MLP output before the residual: the block output does NOT move by δ."""
    model, tok = gemma3
    adapter = adapter_for(model)
    ids = _ids(tok, n=1)
    delta = torch.randn(1, HIDDEN)
    block = adapter.module(model, "block", 1)
    s0, s1, m = {}, {}, {}
    with torch.no_grad():
        with hooks([record_output(block, s0, "h"), record_output(adapter.module(model, "mlp_out", 1), m, "m")]):
            model(input_ids=ids)
        with hooks([record_output(block, s1, "h"),
                    edit_output(adapter.module(model, "mlp_out", 1), add_at(torch.tensor([0]), torch.tensor([2]), delta))]):
            model(input_ids=ids)
        post = adapter.module(model, "mlp_post_norm", 1)
        expected = post(m["m"][0, 2] + delta[0]) - post(m["m"][0, 2])
    torch.testing.assert_close(s1["h"][0, 2] - s0["h"][0, 2], expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------ truncation
def test_stop_after_truncates_the_forward(family_model):
    _, model, tok = family_model
    adapter = adapter_for(model)
    ids = _ids(tok)
    store: dict = {}
    regs = [record_output(adapter.module(model, "block", i), store, i) for i in range(N_LAYERS)]
    regs.append(record_output(adapter.module(model, "final_norm"), store, "final"))
    regs.append(stop_after(adapter.module(model, "block", 1)))
    backbone = adapter.module(model, "backbone")
    with torch.no_grad(), hooks(regs):
        result = run_truncated(lambda: backbone(input_ids=ids))
    assert result is None
    assert set(store) == {0, 1}
    # the recorded block output equals the untruncated one
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(store[1], full, atol=1e-6, rtol=1e-5)


def test_stop_forward_propagates_without_run_truncated(llama):
    model, tok = llama
    adapter = adapter_for(model)
    with pytest.raises(StopForward):
        with torch.no_grad(), hooks([stop_after(adapter.module(model, "block", 0))]):
            model(input_ids=_ids(tok))


def test_run_truncated_does_not_swallow_other_errors():
    def boom():
        raise ValueError("x")

    with pytest.raises(ValueError):
        run_truncated(boom)


# ------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_tracks_weights_and_ignores_storage_details(llama):
    model, _ = llama
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(model)
    assert fp == model_fingerprint(make_model("llama"))  # same seed → same weights
    with torch.no_grad():
        adapter_for(model).weight(model, "mlp_out", 0)[0, 0] += 1e-3
    assert model_fingerprint(model) != fp
    assert model_fingerprint(make_model("llama", seed=1)) != fp


# ------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_load_model_round_trip_keeps_fingerprint(model_factory, tmp_path, family):
    from pipeline.models.loading import load_model

    model, tok = model_factory(family)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.fingerprint == model_fingerprint(model)
    assert loaded.model.training is False
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer("Rome")["input_ids"] == tok("Rome")["input_ids"]
    assert adapter_for(loaded.model).family == family


def test_load_model_errors(tmp_path):
    from pipeline.models.loading import ModelLoadError, load_model

    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(tmp_path, dtype="float33")


# ------------------------------------------------------------------------------------ other families
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_llama_like_families(tok, family):
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    cls = {"mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    cfg = cls(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    adapter = adapter_for(model)
    assert adapter.family == family and adapter.num_layers(model) == 2
    assert tuple(adapter.weight(model, "mlp_out", 1).shape) == (HIDDEN, INTER)
    ids = _ids(tok)
    with torch.no_grad():
        hidden = adapter.module(model, "backbone")(input_ids=ids).last_hidden_state
        torch.testing.assert_close(adapter.logits(model, hidden), model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_gemma3_multimodal_alias(tok):
    """BUG (pipeline/models/adapters.py, FAMILIES["gemma3"]): the 'gemma3' alias is documented as
    serving 'Gemma-3 checkpoints loaded through the multimodal config', but AutoModelForCausalLM
    builds Gemma3ForConditionalGeneration for that model_type, whose decoder lives under
    'model.language_model.layers', so the alias (paths 'model.layers.{}') can never validate."""
    from transformers import AutoModelForCausalLM, Gemma3Config

    from conftest import make_config

    text = make_config("gemma3_text", len(tok))
    cfg = Gemma3Config(text_config=text.to_dict(), mm_tokens_per_image=4,
                       vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=28, patch_size=14))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert model.config.model_type == "gemma3"
    try:
        adapter = adapter_for(model)
    except AdapterError as exc:
        raise AssertionError(f"the 'gemma3' alias does not fit {type(model).__name__}: {exc}") from exc
    assert adapter.num_layers(model) == N_LAYERS
