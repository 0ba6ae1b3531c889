"""Stage ``covariance``: ``E[k kᵀ]`` of one edited projection (role, layer) of the base model.

Writes ``data/covariance/<role>-<layer>/<key id>.safetensors`` in the engine's cache format, so
the apply stage finds it by content key (model fingerprint, corpus hash, cut, dtype).  The settings
(``cov_max_length``, ``cov_max_texts``) are those of ``edit.hparams`` for ``edit.method``.

DVC runs one stage per (role, layer), but one truncated forward pass can serve them all: the first
stage to run computes every configured pair into the user-level content-keyed cache
(``cache_dir``, default ``~/.cache/editledger/covariance``) and copies out its own; the others
find theirs there.  So five layers cost one pass, not five.

The batch stages read these entries back with :func:`cached_covariances`.
"""

from __future__ import annotations

from pipeline.editing.covariance import cache_keys, entry_path, key_id, second_moments
from pipeline.editing.hparams import HParams
from pipeline.ledger import atomic
from pipeline.models.adapters import adapter_for
from pipeline.stages.common import (Project, StageError, base_model, configured_covariances, corpus,
                                    resolve_hparams, user_cache)


def run(project: Project, role: str, layer: int, progress: bool = True) -> str:
    cfg = project.params()
    targets = configured_covariances(cfg)
    if (role, layer) not in targets:
        raise StageError(f"{role}@{layer} is not listed under covariance: in params.yaml")
    _, hp = resolve_hparams(project, cfg, cfg["edit"]["method"])
    lm = base_model(project)
    adapter = adapter_for(lm.model)
    for _, l in targets:
        adapter.check_layer(lm.model, l)
    scratch = user_cache(project, cfg)
    _, ids = second_moments(lm.model, lm.tokenizer, adapter, lm.fingerprint, corpus(project, cfg), targets,
                            hp.cov_max_length, hp.cov_max_texts, hp.cov_batch_tokens, hp.cov_dtype, scratch, progress)
    kid = ids[(role, layer)]
    dest = entry_path(project.covariance_dir, (role, layer), kid)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(dest, entry_path(scratch, (role, layer), kid).read_bytes())
    return kid


def cached_covariances(project: Project, lm, targets: list[tuple[str, int]], hp: HParams):
    """The covariances of ``targets`` from ``data/covariance`` — never computed here: a missing one
    is a configuration error (the covariance stages own that folder)."""
    cfg = project.params()
    cor = corpus(project, cfg)
    dtype = hp.cov_dtype
    chunks = cor.chunks(lm.tokenizer, hp.cov_max_length, hp.cov_max_texts)
    ids = {t: key_id(k) for t, k in cache_keys(lm.fingerprint, cor, chunks, targets, hp.cov_max_length, dtype).items()}
    for (role, layer), kid in ids.items():
        folder = entry_path(project.covariance_dir, (role, layer), kid).parent
        if not folder.is_dir():
            raise StageError(f"no covariance for {role}@{layer}: {folder} does not exist; add layer {layer} (role "
                             f"{role}) under `covariance:` in params.yaml and run `dvc repro -P`")
        if not entry_path(project.covariance_dir, (role, layer), kid).exists():
            raise StageError(f"{folder} holds a covariance computed with other settings (model, corpus, "
                             "cov_max_length/cov_max_texts or cov_dtype) than this batch's hyper-parameters")
    return second_moments(lm.model, lm.tokenizer, adapter_for(lm.model), lm.fingerprint, cor, targets,
                          hp.cov_max_length, hp.cov_max_texts, hp.cov_batch_tokens, dtype, project.covariance_dir,
                          progress=False)
