"""The key/value metadata of an exported GGUF file: the base model's, and where the export came from.

Two sources for the base's part:

* **carried over** from the GGUF the base model was made from (the built-in models ship as GGUF
  files; ``models/loading.py`` dequantises them): every key except the file type and the
  quantisation version, byte for byte, so llama.cpp sees the base's own tokenizer (including its
  pre-tokenizer name, which cannot be recovered from a Hugging Face directory), chat template and
  description.  Its hyper-parameters are checked against the model's config first: a GGUF of
  another model is refused rather than carried over.
* **built** for a base that is a Hugging Face directory: the family's hyper-parameters
  (``gguf_layout``) and a byte-level BPE tokenizer (``tokenizer.json``) as llama.cpp's converter
  writes them.  ``tokenizer.ggml.pre`` is left out (llama.cpp then uses its default GPT-2
  pre-tokenizer and says so when it loads the file).

Provenance goes under ``editledger.*`` (entry id and directory, base and state fingerprints, the
reference asked for, whether the state is approximate); readers ignore keys they do not know.
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import gguf

from pipeline.export.files import ExportError, Provenance
from pipeline.export.gguf_layout import DTYPES, GgufLayout

G = gguf.Keys.General
NOT_CARRIED = {G.ARCHITECTURE, G.FILE_TYPE, G.QUANTIZATION_VERSION}  # the writer sets these anew


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-6)  # GGUF stores float32
    return a == b


def carry_over(writer: gguf.GGUFWriter, source: Path, layout: GgufLayout, config, tensor_names: list[str]) -> None:
    """Copy ``source``'s metadata into ``writer`` after checking that it describes this model."""
    reader = gguf.GGUFReader(source)
    arch = reader.fields[G.ARCHITECTURE].contents()
    if arch != layout.arch_name:
        raise ExportError(f"{source} is a {arch!r} GGUF, the model is {layout.arch_name!r}: it is not this base model's")
    for key, want in layout.keys(config).items():
        if key in reader.fields and not _same(reader.fields[key].contents(), want):
            raise ExportError(f"{source} does not describe this base model: {key} is {reader.fields[key].contents()} "
                              f"there, {want} in the model's config")
    theirs, ours = sorted(t.name for t in reader.tensors), sorted(tensor_names)
    if theirs != ours:
        diff = sorted(set(theirs) ^ set(ours))
        raise ExportError(f"{source} holds other tensors than the model ({len(diff)} differ, e.g. {diff[0]})")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in NOT_CARRIED:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub)


@contextmanager
def _quiet_gguf() -> Iterator[None]:
    """The gguf package logs what it skips of a tokenizer (e.g. the pair template's separator, which
    GGUF has no key for) as warnings; they are not the user's concern."""
    log = logging.getLogger("gguf")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _put(writer: gguf.GGUFWriter, key: str, value: int | float) -> None:
    (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)


def build(writer: gguf.GGUFWriter, layout: GgufLayout, config, tokenizer_dir: Path, name: str) -> None:
    """Hyper-parameters from the config and the tokenizer of ``tokenizer_dir`` (a HF model directory)."""
    writer.add_name(name)
    for key, value in layout.keys(config).items():
        _put(writer, key, value)
    tokenizer_json = Path(tokenizer_dir) / "tokenizer.json"
    try:
        if not tokenizer_json.is_file():
            raise FileNotFoundError(tokenizer_json)
        vocab = gguf.vocab.BpeVocab(Path(tokenizer_dir))
    except FileNotFoundError:
        raise ExportError(f"{tokenizer_dir}: no byte-level BPE tokenizer.json; GGUF export builds the tokenizer "
                          "metadata of a Hugging Face base model from one") from None
    added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens") or []
    kinds = {a["content"]: gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED for a in added}
    tokens = [text if isinstance(text, str) else text.decode("utf-8") for text, _, _ in vocab.all_tokens()]
    types = [kinds.get(t, gguf.TokenType.NORMAL) for t in tokens]
    padding = max(0, config.vocab_size - len(tokens))  # embedding rows beyond the tokenizer (padded vocabularies)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), len(tokens) + padding)]
    types += [gguf.TokenType.UNUSED] * padding
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with _quiet_gguf():
        gguf.SpecialVocab(Path(tokenizer_dir), load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def finish(writer: gguf.GGUFWriter, dtype: str, provenance: Provenance) -> None:
    """The file type of this export and where it came from."""
    writer.add_file_type(DTYPES[dtype][1])
    for key, value in provenance.metadata().items():
        writer.add_string(key, value)
