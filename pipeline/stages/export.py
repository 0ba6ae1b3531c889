"""Stage ``export`` and the ``editledger export`` command: a ledger state as a PEFT adapter or a GGUF file.

Both run one export of the project's ledger on its base model (``data/model``, checked against
``data/model.json``).  What only the project knows is decided here: the base model's GGUF
metadata comes from the packaged GGUF the model stage dequantised (the built-in models), else it
is built from ``data/model``; an adapter names ``data/model`` (relative to the project root) as
its base.

The DVC stage (one per format in ``export.formats`` of ``params.yaml``; none by default) writes
``exports/peft/`` (the adapter directory) or ``exports/gguf/`` (``model.gguf`` and the export's
report, ``editledger.json``).  Unlike the command, it replaces its own previous output, as every
stage does (DVC deletes a stage's outputs before running it anyway).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.export import ExportRequest, GgufSource, export, prepare
from pipeline.export.files import atomic_dir
from pipeline.models.loading import DEFAULT_MODEL, GGUF_SOURCES, find_default_gguf
from pipeline.stages.common import Project, base_model, write_json

BASE_NAME = "data/model"
EXPORTS = "exports"
GGUF_FILE, REPORT_FILE = "model.gguf", "editledger.json"


def _record(project: Project) -> dict:
    """``data/model.json`` as far as it can be read (``base_model`` reports a missing or damaged one)."""
    try:
        doc = json.loads(project.model_json.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def gguf_source(project: Project, record: dict) -> GgufSource:
    """The packaged GGUF the base model came from (built-in models), else none: metadata from ``data/model``."""
    source = record.get("source")
    name = DEFAULT_MODEL if source == "default" else source
    return GgufSource(find_default_gguf(name) if name in GGUF_SOURCES else None, project.model_dir)


def run_export(project: Project, req: ExportRequest) -> dict:
    """Check the request (no model loaded), then load the base model and export; the report."""
    record = _record(project)
    target = prepare(project.ledger, req, record.get("model_type"))
    source = gguf_source(project, record) if req.fmt == "gguf" else None
    lm = base_model(project)
    return export(project.ledger, req, target, lm.model, lm.tokenizer, source, BASE_NAME)


def run(project: Project, fmt: str) -> dict:
    """The DVC stage for one format: ``exports/<fmt>/`` from the ``export`` section of params.yaml."""
    cfg = project.params()["export"]
    final = project.root / EXPORTS / fmt
    if final.exists():
        shutil.rmtree(final)

    def request(out: Path) -> ExportRequest:
        return ExportRequest(str(cfg["entry"]), fmt, out, cfg["gguf_dtype"] if fmt == "gguf" else "f32",
                             cfg["peft_rtol"] if fmt == "peft" else None)

    if fmt != "gguf":
        return run_export(project, request(final))
    with atomic_dir(final) as tmp:
        report = run_export(project, request(tmp / GGUF_FILE))
        write_json(tmp / REPORT_FILE, report)
    return report
