"""Model-family adapters: the only place that knows module names.

The editing math talks about *roles* (the MLP output projection that is edited, its input = the
key, the attention output projection, the final norm, the LM head, the decoder block) and never
about architectures.  Each family maps those roles to module paths; ``{}`` stands for the layer
index.  Adding a family is adding one entry to ``FAMILIES`` – no ``if`` elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

class AdapterError(ValueError):
    """The model does not look like the family its config claims (or no family fits)."""


@dataclass(frozen=True)
class Adapter:
    """Role → module-path map of one model family.

    ``transposed`` is true for GPT-2's ``Conv1D`` whose weight is stored as ``[in, out]``;
    :meth:`weight` always returns the ``[out, in]`` view so the math never has to care.
    ``mlp_post_norm`` names the norm that Gemma-style blocks apply to the MLP output before it
    joins the residual stream: the value space of an edit is the output of ``mlp_out`` (where the
    least-squares update is exact), and this role lets probes find what actually enters the
    residual.  ``attn_resid`` is the same for
    attention: the module whose output is the attention's contribution to the residual stream
    (the output projection, or Gemma's post-attention norm after it); ``None`` means ``attn_out``.
    """

    family: str
    backbone: str  # module whose forward returns the final-normed last hidden state
    blocks: str  # ModuleList of decoder blocks
    block: str
    mlp_out: str
    attn_out: str
    final_norm: str
    lm_head: str
    transposed: bool = False
    mlp_post_norm: str | None = None
    attn_resid: str | None = None

    # ----------------------------------------------------------------- module access
    def path(self, role: str, layer: int | None = None) -> str:
        template = getattr(self, role)
        if template is None:
            raise AdapterError(f"family {self.family!r} has no role {role!r}")
        if "{}" in template:
            if layer is None:
                raise AdapterError(f"role {role!r} needs a layer index")
            return template.format(layer)
        return template

    def module(self, model: nn.Module, role: str, layer: int | None = None) -> nn.Module:
        if role == "attn_resid" and self.attn_resid is None:
            role = "attn_out"
        return model.get_submodule(self.path(role, layer))

    def num_layers(self, model: nn.Module) -> int:
        return len(model.get_submodule(self.blocks))

    def check_layer(self, model: nn.Module, layer: int) -> None:
        n = self.num_layers(model)
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
            raise AdapterError(f"layer {layer!r} out of range: the model has layers 0..{n - 1}")

    def parameter_name(self, role: str, layer: int) -> str:
        """State-dict name of the weight written for ``role`` at ``layer``."""
        return self.path(role, layer) + ".weight"

    def weight(self, model: nn.Module, role: str, layer: int) -> torch.Tensor:
        """The ``[out, in]`` weight of a projection (a view of the parameter's storage)."""
        w = self.module(model, role, layer).weight
        return w.T if self.transposed else w

    def in_out_dims(self, model: nn.Module, role: str, layer: int) -> tuple[int, int]:
        out_dim, in_dim = self.weight(model, role, layer).shape
        return in_dim, out_dim

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of final-normed hidden states (with the config's soft-capping)."""
        logits = self.module(model, "lm_head")(hidden)
        cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def validate(self, model: nn.Module) -> None:
        """Fail early, with the missing path, when the model does not match the family."""
        for role in ("backbone", "blocks", "final_norm", "lm_head"):
            self._require(model, self.path(role))
        for role in ("block", "mlp_out", "attn_out"):
            self._require(model, self.path(role, 0))
        if self.mlp_post_norm:
            self._require(model, self.path("mlp_post_norm", 0))
        if self.attn_resid:
            self._require(model, self.path("attn_resid", 0))

    def _require(self, model: nn.Module, path: str) -> None:
        try:
            model.get_submodule(path)
        except AttributeError as exc:
            raise AdapterError(f"{self.family} adapter: module {path!r} not found in the model") from exc


def _llama_like(backbone: str = "model", post_norm: bool = False) -> dict:
    """Paths of Llama-style decoders (also Mistral, Qwen2, Gemma-3) under ``backbone``."""
    layer = f"{backbone}.layers.{{}}"
    return dict(backbone=backbone, blocks=f"{backbone}.layers", block=layer, mlp_out=f"{layer}.mlp.down_proj",
                attn_out=f"{layer}.self_attn.o_proj", final_norm=f"{backbone}.norm", lm_head="lm_head",
                mlp_post_norm=f"{layer}.post_feedforward_layernorm" if post_norm else None,
                attn_resid=f"{layer}.post_attention_layernorm" if post_norm else None)


FAMILIES: dict[str, Adapter] = {
    "llama": Adapter(family="llama", **_llama_like()),
    "mistral": Adapter(family="mistral", **_llama_like()),
    "qwen2": Adapter(family="qwen2", **_llama_like()),
    "gemma3_text": Adapter(family="gemma3_text", **_llama_like(post_norm=True)),
    # Gemma-3 checkpoints with the multimodal config: the text decoder sits under language_model.
    "gemma3": Adapter(family="gemma3", **_llama_like("model.language_model", post_norm=True)),
    "gpt2": Adapter(
        family="gpt2",
        backbone="transformer",
        blocks="transformer.h",
        block="transformer.h.{}",
        mlp_out="transformer.h.{}.mlp.c_proj",
        attn_out="transformer.h.{}.attn.c_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        transposed=True,
    ),
    "gptj": Adapter(
        family="gptj",
        backbone="transformer",
        blocks="transformer.h",
        block="transformer.h.{}",
        mlp_out="transformer.h.{}.mlp.fc_out",
        attn_out="transformer.h.{}.attn.out_proj",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
    ),
    "gpt_neox": Adapter(
        family="gpt_neox",
        backbone="gpt_neox",
        blocks="gpt_neox.layers",
        block="gpt_neox.layers.{}",
        mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn_out="gpt_neox.layers.{}.attention.dense",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
    ),
}


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family, checked against the actual module tree."""
    model_type = getattr(model.config, "model_type", None)
    adapter = FAMILIES.get(model_type)
    if adapter is None:
        raise AdapterError(
            f"no adapter for model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    adapter.validate(model)
    return adapter
