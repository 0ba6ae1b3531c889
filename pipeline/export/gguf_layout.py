"""How a model family's weights and hyper-parameters are laid out in a GGUF file (llama.cpp's layout).

One :class:`GgufLayout` per family, as data (the ``FAMILIES`` table of ``models/adapters.py`` does
the same for module names): the llama.cpp architecture, the hyper-parameters it reads, and whether
its attention query/key rows are stored in llama.cpp's rotary order.  The tensor names come from
the ``gguf`` package's own map (``get_tensor_name_map``), the same one llama.cpp's converter and
transformers' GGUF reader use.  What differs from the Hugging Face state dict, and is undone by
readers (llama.cpp expects it, transformers reverses it):

* Llama ``q_proj``/``k_proj`` rows are permuted from HF's half-split rotary order to llama.cpp's
  interleaved order (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``; transformers'
  ``LlamaTensorProcessor`` applies the inverse);
* GPT-2's ``Conv1D`` weights, stored ``[in, out]``, are written ``[out, in]`` like every other
  matrix;
* a tied LM head is not written (readers tie ``output`` to ``token_embd`` when it is absent).

In an ``f16`` file the matrices are float16 and the vectors (norms, biases) and position
embeddings float32, as llama.cpp's converter writes them.  Families without an entry are refused:
transformers cannot read GPT-J or GPT-NeoX GGUF files back, and Gemma-3's
(``query_pre_attn_scalar``, the sliding-window pattern) only at its defaults, so an export of
those could not be checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pipeline.export.files import ExportError

K = gguf.Keys.LLM
A = gguf.Keys.Attention
R = gguf.Keys.Rope

# file dtype (config.GGUF_DTYPES) → (numpy dtype of the matrices, GGUF file type)
DTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}
KEEP_F32 = {gguf.MODEL_TENSOR.POS_EMBD}  # written float32 even in an f16 file (as llama.cpp's converter does)


@dataclass(frozen=True)
class GgufLayout:
    arch: gguf.MODEL_ARCH
    hparams: Callable[[object], dict[str, int | float]]  # GGUF key (with "{arch}") → value, from the HF config
    rotary_permute: bool = False

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def keys(self, config) -> dict[str, int | float]:
        """The hyper-parameters under their full GGUF keys (``llama.block_count`` …)."""
        return {key.format(arch=self.arch_name): value for key, value in self.hparams(config).items()}


def _llama(c) -> dict[str, int | float]:
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": c.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"rope scaling {rope['rope_type']!r} is not written by the GGUF export (llama.cpp would run "
                          "the model with unscaled rotary frequencies)")
    return {K.CONTEXT_LENGTH: c.max_position_embeddings, K.EMBEDDING_LENGTH: c.hidden_size,
            K.BLOCK_COUNT: c.num_hidden_layers, K.FEED_FORWARD_LENGTH: c.intermediate_size,
            A.HEAD_COUNT: c.num_attention_heads, A.HEAD_COUNT_KV: c.num_key_value_heads,
            A.LAYERNORM_RMS_EPS: float(c.rms_norm_eps), R.FREQ_BASE: float(rope["rope_theta"]),
            R.DIMENSION_COUNT: c.head_dim, K.VOCAB_SIZE: c.vocab_size}


def _gpt2(c) -> dict[str, int | float]:
    return {K.CONTEXT_LENGTH: c.n_positions, K.EMBEDDING_LENGTH: c.n_embd, K.BLOCK_COUNT: c.n_layer,
            K.FEED_FORWARD_LENGTH: c.n_inner or 4 * c.n_embd, A.HEAD_COUNT: c.n_head,
            A.LAYERNORM_EPS: float(c.layer_norm_epsilon)}


GGUF_LAYOUTS: dict[str, GgufLayout] = {
    "llama": GgufLayout(gguf.MODEL_ARCH.LLAMA, _llama, rotary_permute=True),
    "gpt2": GgufLayout(gguf.MODEL_ARCH.GPT2, _gpt2),
}


def layout_for(model_type: str) -> GgufLayout:
    """The family's layout; :class:`ExportError` naming the supported families if it has none."""
    if model_type not in GGUF_LAYOUTS:
        raise ExportError(f"GGUF export supports the model families {', '.join(sorted(GGUF_LAYOUTS))}, whose GGUF files "
                          "transformers reads back with every setting of their config, so that the export can be "
                          f"checked; not {model_type!r}: export it with --format peft, or `materialize` it as a Hugging "
                          "Face directory")
    return GGUF_LAYOUTS[model_type]


@dataclass(frozen=True)
class GgufTensor:
    name: str  # GGUF tensor name
    source: str  # the model parameter it holds
    data: np.ndarray  # in GGUF's row order and the file's dtype


def _rotary_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split rotary rows → llama.cpp's interleaved pairs, per head (weights or biases)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_plan(model: nn.Module, layout: GgufLayout, dtype: str) -> list[GgufTensor]:
    """Every parameter of ``model`` as the GGUF tensor llama.cpp expects (names, row order, dtype)."""
    if dtype not in DTYPES:
        raise ExportError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    np_dtype = DTYPES[dtype][0]
    config = model.config
    names = gguf.get_tensor_name_map(layout.arch, config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads,
             "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    keep_f32 = {gguf.TENSOR_NAMES[t] for t in KEEP_F32}
    modules = dict(model.named_modules())
    plan = []
    for name, param in model.named_parameters():  # a tied LM head is the embedding's parameter: listed once
        module, _, leaf = name.rpartition(".")
        base = names.get_name(module)
        if base is None:
            raise ExportError(f"{name}: llama.cpp's {layout.arch_name} layout has no tensor for it")
        t = param.detach().to("cpu", torch.float32)
        if isinstance(modules[module], Conv1D) and leaf == "weight":
            t = t.T
        kind = base.rsplit(".", 1)[-1]
        if layout.rotary_permute and kind in heads:
            t = _rotary_permute(t, heads[kind])
        stored = np.float32 if t.ndim < 2 or base in keep_f32 else np_dtype
        plan.append(GgufTensor(f"{base}.{leaf}", name, t.contiguous().numpy().astype(stored)))
    return plan
