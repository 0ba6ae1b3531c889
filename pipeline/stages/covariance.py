"""Stage ``covariance``: ``E[k kᵀ]`` of one edited projection (role, layer) of the base model.

Writes ``data/covariance/<role>-<layer>/<key id>.safetensors`` in the engine's cache format, so
the apply stage finds it by content key (model fingerprint, corpus hash, cut, dtype).  The settings
(``cov_max_length``, ``cov_max_texts``) are those of ``edit.hparams`` for ``edit.method``.

DVC runs one stage per (role, layer), but one truncated forward pass can serve them all: the first
stage to run computes every configured pair into the user-level content-keyed cache
(``cache_dir``, default ``~/.cache/editledger/covariance``) and copies out its own; the others
find theirs there.  So five layers cost one pass, not five.
"""

from __future__ import annotations

from pipeline.editing.covariance import entry_path, second_moments
from pipeline.ledger import atomic
from pipeline.models.adapters import adapter_for
from pipeline.models.loading import cache_home
from pipeline.stages.common import (Project, StageError, base_model, configured_covariances, corpus,
                                    resolve_hparams)


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
    scratch = project.path(cfg["cache_dir"]) if cfg["cache_dir"] else cache_home() / "covariance"
    _, ids = second_moments(lm.model, lm.tokenizer, adapter, lm.fingerprint, corpus(project, cfg), targets,
                            hp.cov_max_length, hp.cov_max_texts, hp.cov_batch_tokens, hp.cov_dtype, scratch, progress)
    kid = ids[(role, layer)]
    dest = entry_path(project.covariance_dir, (role, layer), kid)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(dest, entry_path(scratch, (role, layer), kid).read_bytes())
    return kid
