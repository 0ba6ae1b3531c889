"""Stage ``model``: materialise the base model into ``data/model/`` and record its fingerprint.

The model is loaded from ``model.path`` (a local HF directory, or a built-in name / null for the
default GGUF package), cast to ``model.dtype`` and saved as a clean safetensors HF directory.  The
fingerprint is taken from the *saved* directory, reloaded, so it is the fingerprint every later
stage will see; ``data/model.json`` is what batches depend on.  The fingerprint covers the weights
and the config but not the tokenizer files, so ``model.json`` also records the sha256 of every
file that is not a weight file, and the stages check them when they load the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipeline.data import sha256_file
from pipeline.models.loading import GGUF_SOURCES, load_model
from pipeline.stages.common import Project, write_json


def file_digests(model_dir: Path) -> dict[str, str]:
    """sha256 of each file of a model directory except the weights (the fingerprint covers those)."""
    return {p.name: sha256_file(p) for p in sorted(model_dir.iterdir()) if p.is_file() and p.suffix != ".safetensors"}


def run(project: Project) -> dict:
    cfg = project.params()["model"]
    source = cfg["path"]
    if source is not None and source not in GGUF_SOURCES:
        source = str(project.path(source))
    lm = load_model(source, device="cpu", dtype=cfg["dtype"])
    project.data.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=project.data))
    try:
        lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        saved = load_model(tmp, device="cpu", dtype=cfg["dtype"])
        files = file_digests(tmp)
        if project.model_dir.exists():
            shutil.rmtree(project.model_dir)
        os.replace(tmp, project.model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = {"fingerprint": saved.fingerprint, "dtype": cfg["dtype"], "source": cfg["path"] or "default",
            "model_type": saved.model.config.model_type, "n_layers": saved.model.config.num_hidden_layers,
            "n_parameters": sum(p.numel() for p in saved.model.parameters()), "files": files}
    write_json(project.model_json, info)
    return info
