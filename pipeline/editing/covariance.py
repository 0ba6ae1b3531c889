"""Key second moments ``C = E[k kᵀ]`` of edited projections, computed once and cached.

The covariance is the expensive, method-independent part of an edit: it depends only on the
weights, the layer, the projection, the corpus and how the corpus was cut.  So

* one truncated forward pass serves every requested (role, layer): the forward stops right after
  the highest layer needed;
* the pass runs in the compute dtype ``cov_dtype`` (a bfloat16 copy of the model where asked:
  several times faster on CPUs with bfloat16 dot products); per-batch products are formed in
  that dtype and accumulated in float64;
* results are cached on disk under a content key; a cached file carries its key and a hash of
  its bytes, and one that does not match is rejected (never silently used);
* the corpus is streamed (:mod:`pipeline.corpus`), and under ``torchrun`` the batches are shared
  among the processes (:mod:`pipeline.distributed`): each tokenises and forwards its own, the
  float64 sums are all-reduced, rank 0 writes.  The batches are those one process forms, so a
  batch's product is the same bits wherever it runs, and the result equals the single process's
  up to the order of the float64 additions.  The key does not name the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline import distributed
from pipeline.corpus import Corpus, Cut, CutSummary, chunked, key_fields, shard_batches, summarise
from pipeline.editing.hooks import hooks, record_input, run_truncated, stop_after
from pipeline.editing.precision import working_copy
from pipeline.models.adapters import Adapter

CACHE_FORMAT = 1


class CovarianceCacheError(RuntimeError):
    """A cache entry does not match its key or its content hash."""


def cache_key(fingerprint: str, role: str, layer: int, corpus: Corpus, cut: Cut, summary: CutSummary,
              dtype: str) -> dict:
    """What one (role, layer)'s second moment is a function of: the weights, the corpus content and
    how it was cut (counted tokens and windows), the compute dtype — never how many processes
    computed it."""
    return {
        "format": CACHE_FORMAT,
        "statistic": "uncentred second moment E[k k^T], float64 accumulation",
        "model_fingerprint": fingerprint,
        "role": role,
        "layer": layer,
        "corpus_sha256": corpus.sha256,
        "n_tokens": summary.n_tokens,
        "n_chunks": summary.n_windows,
        "max_length": cut.max_length,
        "dtype": dtype,  # the compute dtype of the pass (the weights are in the fingerprint)
        **key_fields(corpus, cut, summary),
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
def accumulate(model, adapter: Adapter, batches: Iterable[list[list[int]]], targets: list[tuple[str, int]],
               width: int, progress: bool = True, total: int | None = None
               ) -> tuple[dict[tuple[str, int], torch.Tensor | None], int]:
    """``Σ k kᵀ`` (float64, on the model's device; None if no batch) of each (role, layer) and the
    number of tokens, over ``batches`` padded to ``width``, in one truncated pass."""
    device = next(model.parameters()).device
    top = max(layer for _, layer in targets)
    acc: dict[tuple[str, int], torch.Tensor | None] = {t: None for t in targets}
    n_tokens = 0
    store: dict = {}
    regs = [record_input(adapter.module(model, role, layer), store, (role, layer)) for role, layer in targets]
    regs.append(stop_after(adapter.module(model, "block", top)))
    backbone = adapter.module(model, "backbone")
    with hooks(regs):
        for batch in tqdm(batches, desc="covariance", disable=not progress, unit="batch", total=total):
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
            distributed.fault_point("covariance:batch")
    return acc, n_tokens


def compute_second_moments(model, adapter: Adapter, chunks: list[list[int]], targets: list[tuple[str, int]],
                           batch_tokens: int, progress: bool = True) -> dict[tuple[str, int], torch.Tensor]:
    """``E[k kᵀ]`` for each (role, layer) over every token of ``chunks``, in this process."""
    width = max(len(c) for c in chunks)
    sums, n_tokens = accumulate(model, adapter, chunked(chunks, max(1, batch_tokens // width)), targets, width, progress)
    return {t: (sums[t] / n_tokens).cpu() for t in targets}


def sharded_second_moments(model, tok, adapter: Adapter, corpus: Corpus, cut: Cut, summary: CutSummary,
                           targets: list[tuple[str, int]], batch_tokens: int, progress: bool = True
                           ) -> dict[tuple[str, int], torch.Tensor]:
    """``E[k kᵀ]`` over the corpus: each rank forwards its share of the batches (all of them in a
    single process) and tokenises only the texts they hold (:func:`~pipeline.corpus.shard_batches`);
    the float64 sums and token counts are summed over the ranks."""
    batches, share = shard_batches(corpus, tok, cut, summary, max(1, batch_tokens // summary.width))
    sums, n_tokens = accumulate(model, adapter, batches, targets, summary.width, progress, total=share)
    # rank 0 always has a batch; a rank with none contributes zeros of the same shapes
    shapes = distributed.broadcast({t: tuple(s.shape) for t, s in sums.items()} if distributed.is_main() else None,
                                   "covariance: sharing the statistic shapes")
    device = next(model.parameters()).device
    tensors = [sums[t] if sums[t] is not None else torch.zeros(shapes[t], dtype=torch.float64, device=device)
               for t in targets]
    count = torch.tensor([n_tokens], dtype=torch.long, device=device)
    distributed.sum_tensors([*tensors, count], "covariance all-reduce")
    return {t: (s / int(count)).cpu() for t, s in zip(targets, tensors)}


def cut_of(hp) -> Cut:
    """The corpus cut the hyper-parameters ask for (``cov_max_length``, ``cov_max_texts``, ``cov_max_tokens``)."""
    return Cut(hp.cov_max_length, hp.cov_max_texts, hp.cov_max_tokens)


def cache_keys(fingerprint: str, corpus: Corpus, cut: Cut, summary: CutSummary, targets: list[tuple[str, int]],
               dtype: str) -> dict[tuple[str, int], dict]:
    """The cache key of each (role, layer)."""
    return {t: cache_key(fingerprint, t[0], t[1], corpus, cut, summary, dtype) for t in targets}


def second_moments(model, tok, adapter: Adapter, fingerprint: str, corpus: Corpus, targets: list[tuple[str, int]],
                   cut: Cut, batch_tokens: int, dtype: str, cache_dir: Path | None, progress: bool = True
                   ) -> tuple[dict[tuple[str, int], torch.Tensor], dict[tuple[str, int], str]]:
    """Cached second moments and their cache ids (the ids go into the ledger as fingerprints).

    ``dtype`` is the compute dtype of the pass; the model is cast (a copy) only if something
    has to be computed.  Under ``torchrun`` every rank calls this: rank 0 decides what is missing,
    the ranks compute it together (:func:`sharded_second_moments`), and rank 0 alone writes the
    entries, after the last collective, so a rank that dies leaves nothing written.
    """
    summary = summarise(corpus, tok, cut)
    keys = cache_keys(fingerprint, corpus, cut, summary, targets, dtype)
    ids = {t: key_id(k) for t, k in keys.items()}
    paths = {t: entry_path(cache_dir, t, ids[t]) if cache_dir else None for t in targets}
    missing = distributed.broadcast([t for t in targets if paths[t] is None or not paths[t].exists()]
                                    if distributed.is_main() else None, "covariance: agreeing what is cached")
    result = {t: load_entry(paths[t], keys[t]) for t in targets if t not in missing}
    if missing:
        computed = sharded_second_moments(working_copy(model, dtype), tok, adapter, corpus, cut, summary, missing,
                                          batch_tokens, progress and distributed.is_main())
        for t, cov in computed.items():
            if paths[t] is not None and distributed.is_main():
                save_entry(paths[t], keys[t], cov)
            result[t] = cov
    return {t: result[t] for t in targets}, ids
