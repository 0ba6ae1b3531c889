"""Exports of a ledger state to where edited models are served: a PEFT LoRA adapter and a GGUF file.

One job per module: ``state`` (which entry, its rebuilt weights and net change), ``lowrank`` (the
factorisation math), ``peft_adapter`` (LoRA factors and PEFT's files), ``gguf_layout`` (llama.cpp's
tensor layout per family), ``gguf_metadata`` (the base's metadata and the provenance keys),
``gguf_file`` (writing the file), ``roundtrip`` (reading an export back and comparing logits),
``files`` (provenance, atomic refuse-to-overwrite output), ``run`` (one export, start to end).
"""

from pipeline.export.files import ExportError, Provenance
from pipeline.export.gguf_file import GgufSource, write_gguf
from pipeline.export.lowrank import LowRank, RankError, factor
from pipeline.export.run import FORMATS, ExportRequest, export, prepare

__all__ = ["FORMATS", "ExportError", "ExportRequest", "GgufSource", "LowRank", "Provenance", "RankError", "export",
           "factor", "prepare", "write_gguf"]
