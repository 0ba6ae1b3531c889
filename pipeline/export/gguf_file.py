"""A ledger state as one GGUF file (float32 or float16), written with the ``gguf`` package.

The tensors follow llama.cpp's layout for the family (``gguf_layout``), the metadata is the base
model's plus the export's provenance (``gguf_metadata``).  The bytes are a function of the state:
key/value pairs and tensors are written in a fixed order and nothing time- or path-dependent is
recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
from torch import nn

from pipeline.export import gguf_metadata
from pipeline.export.files import Provenance
from pipeline.export.gguf_layout import GgufTensor, layout_for, tensor_plan


@dataclass(frozen=True)
class GgufSource:
    """Where the base model's metadata comes from: the GGUF it was made from, else its HF directory."""

    gguf_file: Path | None
    model_dir: Path


def write_gguf(path: Path, model: nn.Module, source: GgufSource, provenance: Provenance,
               dtype: str = "f32") -> list[GgufTensor]:
    """Write ``model`` (the edited state) to the GGUF file ``path``; return what was written where."""
    layout = layout_for(model.config.model_type)
    plan = tensor_plan(model, layout, dtype)
    writer = gguf.GGUFWriter(str(path), layout.arch_name)
    if source.gguf_file is not None:
        gguf_metadata.carry_over(writer, source.gguf_file, layout, model.config, [t.name for t in plan])
    else:
        gguf_metadata.build(writer, layout, model.config, source.model_dir,
                            name=f"{model.config.model_type} edited (editledger entry {provenance.entry_id[:12]})")
    gguf_metadata.finish(writer, dtype, provenance)
    for t in plan:
        writer.add_tensor(t.name, t.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return plan
