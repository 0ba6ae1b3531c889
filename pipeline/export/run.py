"""One export, start to end: check the request, rebuild the state, write, read back, move into place.

:func:`prepare` does every check that needs no model (format, dtype, tolerance, destination, entry,
family), so that bad input costs nothing and changes nothing; :func:`export` then rebuilds the
state, writes the format into a temporary path, reads it back (``roundtrip``) and only then moves
it to its destination.  The returned report is what the CLI prints; for an adapter it is also
``editledger.json`` in the adapter directory (without the destination path, so the bytes are a
function of the state).  Everything that ends up in a file is computed on one thread, because
float summation order, and so the last bits, depend on the thread count.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from pipeline.config import EXPORT_FORMATS as FORMATS
from pipeline.export import peft_adapter, roundtrip
from pipeline.export.files import ExportError, atomic_dir, atomic_file, check_free
from pipeline.export.gguf_file import GgufSource, write_gguf
from pipeline.export.gguf_layout import DTYPES, layout_for
from pipeline.export.lowrank import one_thread
from pipeline.export.state import ExportState, Target, build, resolve


@dataclass(frozen=True)
class ExportRequest:
    ref: str  # entry reference or 'head'
    fmt: str  # peft | gguf
    out: Path  # adapter directory (new or empty) or GGUF file (new)
    dtype: str = "f32"  # gguf: f32 | f16; peft: f32
    rtol: float | None = None  # peft: numerical-rank tolerance relative to s_max (None: max(m, n)·ε_float32)
    check: bool = True  # read the export back and compare logits before moving it into place


def prepare(ledger_dir: str | Path, req: ExportRequest, model_type: str | None = None) -> Target:
    """Check everything that needs no model; the entry the export will hold."""
    if req.fmt not in FORMATS:
        raise ExportError(f"unknown export format {req.fmt!r}; choose one of {', '.join(FORMATS)}")
    allowed = DTYPES if req.fmt == "gguf" else ("f32",)
    if req.dtype not in allowed:
        raise ExportError(f"{req.fmt} exports are written as {' or '.join(allowed)}, not {req.dtype!r}")
    if req.rtol is not None and (req.fmt != "peft" or not math.isfinite(req.rtol) or not 0 < req.rtol < 1):
        raise ExportError(f"--rtol {req.rtol} is not usable: it is the PEFT rank tolerance relative to the largest "
                          "singular value, a number in (0, 1)")
    check_free(req.out, directory=req.fmt == "peft")
    if req.fmt == "gguf" and model_type is not None:
        layout_for(model_type)
    target = resolve(ledger_dir, req.ref)
    if req.fmt == "peft" and not target.changed:
        raise ExportError(f"the state after {req.ref} ({target.entry.dirname}) is the base model: it changes no weight, "
                          "so there is no adapter to export")
    return target


def export(ledger_dir: str | Path, req: ExportRequest, target: Target, base_model: nn.Module, tokenizer,
           source: GgufSource | None = None, base_name: str | None = None) -> dict:
    """Write the export of ``target`` (from :func:`prepare`); ``base_model`` is left as it is.

    ``source`` (GGUF) says where the base's metadata comes from (default: the directory the base
    was loaded from); ``base_name`` (PEFT) is recorded as the adapter's ``base_model_name_or_path``.
    """
    state = build(ledger_dir, target, base_model)
    ids = roundtrip.probe_ids(tokenizer)
    report = {**target.provenance.to_dict(), "format": req.fmt, "dtype": req.dtype,
              "model_parameters": sum(p.numel() for p in base_model.parameters())}
    with one_thread():
        if req.fmt == "peft":
            report.update(_peft(req, state, base_model, ids, base_name))
        else:
            report.update(_gguf(req, state, ids, source or GgufSource(None, Path(base_model.name_or_path))))
    return report


def _peft(req: ExportRequest, state: ExportState, base_model: nn.Module, ids, base_name: str | None) -> dict:
    factors = peft_adapter.factor_changes(state.model, state.changes, req.rtol)
    info = {"modules": factors.modules, "lora_parameters": factors.n_parameters,
            "dense_parameters": sum(m["dense_parameters"] for m in factors.modules.values())}
    with atomic_dir(req.out) as tmp:
        peft_adapter.write_adapter(tmp, factors, state.target.provenance, base_name)
        if req.check:
            got = roundtrip.logits(roundtrip.read_peft(base_model, tmp), ids)
            info["round_trip"] = roundtrip.compare("PEFT", roundtrip.logits(state.model, ids), got).to_dict()
        info["bytes"] = sum(p.stat().st_size for p in tmp.iterdir())
        doc = {**state.target.provenance.to_dict(), **info}
        (tmp / peft_adapter.INFO_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return info


def _gguf(req: ExportRequest, state: ExportState, ids, source: GgufSource) -> dict:
    with atomic_file(req.out) as tmp:
        plan = write_gguf(tmp, state.model, source, state.target.provenance, req.dtype)
        origin = f"carried over from {source.gguf_file.name}" if source.gguf_file else "built from the config"
        info = {"tensors": len(plan), "bytes": tmp.stat().st_size, "metadata": origin}
        if req.check:
            reference = state.model if req.dtype == "f32" else roundtrip.rounded_as_stored(state.model, plan)
            expected = roundtrip.logits(reference, ids)
            info["round_trip"] = roundtrip.compare("transformers' GGUF loader", expected,
                                                   roundtrip.logits(roundtrip.read_gguf(tmp), ids)).to_dict()
            if req.dtype != "f32":  # what float16 storage itself costs, against the float32 state
                info["round_trip"]["rounding_max_abs_diff"] = float((roundtrip.logits(state.model, ids) - expected)
                                                                    .abs().max())
    return info
