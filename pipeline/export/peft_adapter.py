"""A ledger state as a PEFT LoRA adapter on the base model: ``adapter_config.json`` + ``adapter_model.safetensors``.

Each changed matrix gets the exact factors of its net change (:func:`~pipeline.export.lowrank.factor`)
at its own rank (``rank_pattern``), with ``lora_alpha = r`` per module (``alpha_pattern``) so PEFT's
scaling α/r is 1 and ``W + B A`` is the edited weight.  GPT-2's ``Conv1D`` stores weights
``[in, out]``; the family adapter says so (``transposed``), the change is factored in ``[out, in]``
like every LoRA and PEFT's ``fan_in_fan_out`` puts it back.  A full-rank change is refused for the
whole export, naming every such matrix and the rank it would need: its factors would be larger
than the matrix itself and an adapter would be no adapter.

``editledger.json`` beside the two PEFT files (written by ``export.run``) records the provenance
and, per matrix, the rank, the tolerance it was chosen with, the first singular value cut off and
the reconstruction error.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pipeline.export.files import ExportError, Provenance
from pipeline.export.lowrank import RankError, factor
from pipeline.models.adapters import adapter_for

CONFIG_FILE, WEIGHTS_FILE, INFO_FILE = "adapter_config.json", "adapter_model.safetensors", "editledger.json"
FLOAT32_EPS = torch.finfo(torch.float32).eps
LORA_LAYERS = (nn.Linear, Conv1D)  # the layer types PEFT puts a LoRA on with these tensor names


@dataclass
class LoraFactors:
    """The factors of a state's changes, ready to be written: PEFT tensors, ranks, and their record."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # module name → rank
    modules: dict[str, dict] = field(default_factory=dict)  # module name → how it was factored
    fan_in_fan_out: bool = False

    @property
    def n_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def _module_of(model: nn.Module, name: str) -> str:
    """The module a changed parameter belongs to; only the weights of linear layers can take a LoRA."""
    module, _, leaf = name.rpartition(".")
    if leaf != "weight" or not isinstance(model.get_submodule(module), LORA_LAYERS):
        raise ExportError(f"{name}: only the weight matrices of linear layers can be exported as LoRA factors")
    return module


def factor_changes(model: nn.Module, changes: dict[str, torch.Tensor], rtol: float | None = None) -> LoraFactors:
    """Factor every net change (in the parameter's layout) into PEFT's ``lora_A``/``lora_B``.

    ``model`` is the edited state: the floor of each rank tolerance is the float32 resolution of
    the edited weight (see :mod:`~pipeline.export.lowrank`).
    """
    transposed = adapter_for(model).transposed
    params = dict(model.named_parameters())
    out = LoraFactors(fan_in_fan_out=transposed)
    full: list[str] = []
    for name in sorted(changes):
        module = _module_of(model, name)
        delta = changes[name].T if transposed else changes[name]  # [out, in], as LoRA's B A
        resolution = FLOAT32_EPS * float(params[name].detach().double().norm())  # what float32 weights can hold
        try:
            low = factor(delta, rtol, atol=resolution)
        except RankError as exc:
            full.append(f"{name} needs rank {exc.rank} (full rank of {exc.shape[0]}×{exc.shape[1]})")
            continue
        if low.rank == 0:
            continue  # changed and changed back: nothing to carry
        out.ranks[module] = low.rank
        out.tensors[f"base_model.model.{module}.lora_A.weight"] = low.a
        out.tensors[f"base_model.model.{module}.lora_B.weight"] = low.b
        m, n = delta.shape
        out.modules[module] = {"rank": low.rank, "shape": [m, n], "rtol": low.rtol, "atol": low.atol, "tol": low.tol,
                               "s_max": low.s_max, "s_first_cut": low.s_next, "relative_residual": low.residual,
                               "max_abs_error": low.max_abs_error, "lora_parameters": low.rank * (m + n),
                               "dense_parameters": m * n}
    if full:
        raise ExportError(f"the state's change is full rank in {len(full)} matrix(es): {'; '.join(full)}; a LoRA adapter "
                          "cannot hold it (export it whole with --format gguf, or `materialize` it)")
    return out


def _jsonable(value):
    """PEFT's config dict as PEFT itself writes it (enums by value, sets as sorted lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def adapter_config(adapter: LoraFactors, base_name: str | None) -> dict:
    """PEFT's own config object (so every field it reads is there), with one rank and α per module."""
    from peft import LoraConfig

    top = max(adapter.ranks.values())
    cfg = LoraConfig(r=top, lora_alpha=top, target_modules=sorted(adapter.ranks), rank_pattern=dict(adapter.ranks),
                     alpha_pattern=dict(adapter.ranks), lora_dropout=0.0, bias="none",
                     fan_in_fan_out=adapter.fan_in_fan_out, task_type="CAUSAL_LM",
                     base_model_name_or_path=base_name, inference_mode=True)
    return _jsonable(cfg.to_dict())


def write_adapter(out_dir: Path, adapter: LoraFactors, provenance: Provenance, base_name: str | None) -> None:
    """Write PEFT's two files into the (new, empty) directory ``out_dir``."""
    if not adapter.ranks:
        raise ExportError(f"the state after entry {provenance.entry_dir} has no weight change from the base model "
                          "beyond float32 rounding: no adapter to export")
    config = adapter_config(adapter, base_name)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_safetensors(adapter.tensors, out_dir / WEIGHTS_FILE, {"format": "pt", **provenance.metadata()})


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A float32 safetensors file whose bytes are a function of its content.

    ``safetensors``' own writer orders the metadata through a hash map, differently in every call,
    so two exports of one state would differ.  The format is simple (little-endian u64 header
    length, JSON header padded with spaces to 8 bytes, the tensors' bytes at the offsets the header
    gives); here the header is canonical JSON and the tensors follow in name order.
    """
    header: dict[str, dict] = {"__metadata__": dict(metadata)}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: only float32 tensors are written, not {t.dtype}")
        blob = t.numpy().astype("<f4", copy=False).tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)
