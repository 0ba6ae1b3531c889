"""Key second moments ``C = E[k kᵀ]`` of edited projections, computed once and cached.

The covariance is the expensive, method-independent part of an edit: it depends only on the
weights, the layer, the projection, the corpus and how the corpus was cut.  So

* one truncated forward pass serves every requested (role, layer): the forward stops right after
  the highest layer needed;
* the pass runs in the compute dtype ``cov_dtype`` (a bfloat16 copy of the model where asked:
  several times faster on CPUs with bfloat16 dot products); per-batch products are formed in
  that dtype and accumulated in float64;
* results are cached on disk under a content key; a cached file carries its key and a hash of
  its bytes, and one that does not match is rejected (never silently used).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline.editing.hooks import hooks, record_input, run_truncated, stop_after
from pipeline.editing.precision import working_copy
from pipeline.models.adapters import Adapter

CACHE_FORMAT = 1


class CovarianceCacheError(RuntimeError):
    """A cache entry does not match its key or its content hash."""


@dataclass(frozen=True)
class Corpus:
    path: Path
    sha256: str

    @classmethod
    def from_file(cls, path: str | Path) -> Corpus:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"covariance corpus {p} does not exist")
        h = hashlib.sha256(p.read_bytes()).hexdigest()
        return cls(p, h)

    def chunks(self, tok, max_length: int, max_texts: int = 0) -> list[list[int]]:
        """The corpus as consecutive token windows of ``max_length`` (no padding is wasted).

        Non-empty lines (``max_texts`` > 0 keeps the first lines only) are joined by newlines,
        tokenised, and cut into windows; each window starts with the tokenizer's BOS token if it has one.
        """
        lines = [ln.strip() for ln in self.path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if max_texts:
            lines = lines[:max_texts]
        if not lines:
            raise ValueError(f"covariance corpus {self.path} has no text")
        stream: list[int] = tok("\n".join(lines), add_special_tokens=False)["input_ids"]
        bos = [tok.bos_token_id] if _adds_bos(tok) else []
        width = max_length - len(bos)
        return [bos + stream[i : i + width] for i in range(0, len(stream), width)]


def _adds_bos(tok) -> bool:
    ids = tok("a")["input_ids"]
    return tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id


def cache_key(fingerprint: str, role: str, layer: int, corpus: Corpus, n_tokens: int, n_chunks: int,
              max_length: int, dtype: str) -> dict:
    return {
        "format": CACHE_FORMAT,
        "statistic": "uncentred second moment E[k k^T], float64 accumulation",
        "model_fingerprint": fingerprint,
        "role": role,
        "layer": layer,
        "corpus_sha256": corpus.sha256,
        "n_tokens": n_tokens,
        "n_chunks": n_chunks,
        "max_length": max_length,
        "dtype": dtype,  # the compute dtype of the pass (the weights are in the fingerprint)
    }


def key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def entry_path(cache_dir: Path, target: tuple[str, int], kid: str) -> Path:
    """``<cache>/<role>-<layer>/<key id>.safetensors``: one folder per projection, so a DVC stage
    per layer can own its folder while the engine finds entries by content key."""
    return Path(cache_dir) / f"{target[0]}-{target[1]}" / f"{kid}.safetensors"


def save_entry(path: Path, key: dict, cov: torch.Tensor) -> None:
    """Atomic write: temp file, fsync, rename."""
    _save(path, key, {"cov": cov})


def _save(path: Path, key: dict, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": json.dumps(key, sort_keys=True), "sha256": _sha(tensors)}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_entry(path: Path, key: dict) -> torch.Tensor:
    """Read a cache entry, checking that it is for ``key`` and that its bytes are intact."""
    return _load(path, key)["cov"]


def _sha(tensors: dict[str, torch.Tensor]) -> str:
    """A covariance entry's hash is its tensor's (the format of the entries written so far)."""
    if list(tensors) == ["cov"]:
        return tensor_sha256(tensors["cov"])
    return hashlib.sha256("".join(f"{k}:{tensor_sha256(t)}" for k, t in sorted(tensors.items())).encode()).hexdigest()


def _load(path: Path, key: dict) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # truncated / corrupt file: safetensors raises several types
        raise CovarianceCacheError(f"covariance cache entry {path} is unreadable ({exc}); delete it to recompute") from exc
    if meta.get("key") != json.dumps(key, sort_keys=True):
        raise CovarianceCacheError(f"covariance cache entry {path} was computed for a different key; delete it to recompute")
    if meta.get("sha256") != _sha(tensors):
        raise CovarianceCacheError(f"covariance cache entry {path} fails its content hash (corrupted or tampered); delete it to recompute")
    return tensors


def spectra(covs: dict[tuple[str, int], torch.Tensor], ids: dict[tuple[str, int], str],
            cache_dir: Path | None) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """The eigen-decomposition (float64, eigenvalues ascending) of each covariance, for update rules
    that use its spectrum (the null-space projector).  A function of the covariance alone, so it is
    cached beside it under the covariance's own id (about a second per 1536² matrix saved per batch)."""
    out = {}
    for t, cov in covs.items():
        key = {"format": CACHE_FORMAT, "statistic": "eigh of the second moment, float64", "covariance": ids[t]}
        path = Path(cache_dir) / f"{t[0]}-{t[1]}" / f"{ids[t]}.eigh.safetensors" if cache_dir else None
        if path is not None and path.exists():
            e = _load(path, key)
        else:
            values, vectors = torch.linalg.eigh(cov.double())
            e = {"values": values, "vectors": vectors}
            if path is not None:
                _save(path, key, e)
        out[t] = (e["values"], e["vectors"])
    return out


@torch.no_grad()
def compute_second_moments(model, adapter: Adapter, chunks: list[list[int]], targets: list[tuple[str, int]],
                           batch_tokens: int, progress: bool = True) -> dict[tuple[str, int], torch.Tensor]:
    """``E[k kᵀ]`` for each (role, layer) over every token of ``chunks``, in one truncated pass."""
    device = next(model.parameters()).device
    top = max(layer for _, layer in targets)
    acc = {t: None for t in targets}
    n_tokens = 0
    store: dict = {}
    regs = [record_input(adapter.module(model, role, layer), store, (role, layer)) for role, layer in targets]
    regs.append(stop_after(adapter.module(model, "block", top)))
    width = max(len(c) for c in chunks)
    per_batch = max(1, batch_tokens // width)
    backbone = adapter.module(model, "backbone")
    with hooks(regs):
        for start in tqdm(range(0, len(chunks), per_batch), desc="covariance", disable=not progress, unit="batch"):
            batch = chunks[start : start + per_batch]
            lens = torch.tensor([len(c) for c in batch])
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            for i, c in enumerate(batch):
                ids[i, : len(c)] = torch.tensor(c)
            mask = (torch.arange(width)[None, :] < lens[:, None])
            run_truncated(lambda: backbone(input_ids=ids.to(device), attention_mask=mask.to(device).long(), use_cache=False))
            flat_mask = mask.reshape(-1).to(device)
            for t in targets:
                k = store[t].reshape(-1, store[t].shape[-1])[flat_mask]
                prod = (k.T @ k).double()
                acc[t] = prod if acc[t] is None else acc[t].add_(prod)
            n_tokens += int(lens.sum())
    return {t: (acc[t] / n_tokens).cpu() for t in targets}


def cache_keys(fingerprint: str, corpus: Corpus, chunks: list[list[int]], targets: list[tuple[str, int]],
               max_length: int, dtype: str) -> dict[tuple[str, int], dict]:
    """The cache key of each (role, layer): what its second moment is a function of."""
    n_tokens = sum(len(c) for c in chunks)
    return {t: cache_key(fingerprint, t[0], t[1], corpus, n_tokens, len(chunks), max_length, dtype) for t in targets}


def second_moments(model, tok, adapter: Adapter, fingerprint: str, corpus: Corpus, targets: list[tuple[str, int]],
                   max_length: int, max_texts: int, batch_tokens: int, dtype: str, cache_dir: Path | None,
                   progress: bool = True) -> tuple[dict[tuple[str, int], torch.Tensor], dict[tuple[str, int], str]]:
    """Cached second moments and their cache ids (the ids go into the ledger as fingerprints).

    ``dtype`` is the compute dtype of the pass; the model is cast (a copy) only if something
    has to be computed.
    """
    chunks = corpus.chunks(tok, max_length, max_texts)
    keys = cache_keys(fingerprint, corpus, chunks, targets, max_length, dtype)
    ids = {t: key_id(k) for t, k in keys.items()}
    result: dict[tuple[str, int], torch.Tensor] = {}
    missing = []
    for t in targets:
        path = entry_path(cache_dir, t, ids[t]) if cache_dir else None
        if path is not None and path.exists():
            result[t] = load_entry(path, keys[t])
        else:
            missing.append(t)
    if missing:
        computed = compute_second_moments(working_copy(model, dtype), adapter, chunks, missing, batch_tokens, progress)
        for t, cov in computed.items():
            if cache_dir:
                save_entry(entry_path(cache_dir, t, ids[t]), keys[t], cov)
            result[t] = cov
    return result, ids
