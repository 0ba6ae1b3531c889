"""Stage ``covariance``: ``E[k kᵀ]`` of one edited projection (role, layer) of the base model.

Writes ``data/covariance/<role>-<layer>/<key id>.safetensors`` in the engine's cache format, so
the apply stage finds it by content key (model fingerprint, corpus content and cut, dtype).  The
settings (``cov_max_length``, ``cov_max_texts``, ``cov_max_tokens``) are those of ``edit.hparams``
for ``edit.method``; the corpus is ``corpus:`` of params.yaml.

DVC runs one stage per (role, layer), but one truncated forward pass can serve them all: the first
stage to run computes every configured pair into the user-level content-keyed cache
(``cache_dir``, default ``~/.cache/editledger/covariance``) and copies out its own; the others
find theirs there.  So five layers cost one pass, not five.

With ``distributed.processes: N`` > 1 the stage runs itself in N processes under ``torchrun``
(:func:`pipeline.distributed.launch`): the ranks share the corpus's batches and rank 0 writes.  The
number of processes is not a dependency of the stage: the statistic is the same (to float64
rounding) and its key does not name it.

The batch stages read these entries back with :func:`cached_covariances`.
"""

from __future__ import annotations

import json

from pipeline import distributed
from pipeline.corpus import summarise
from pipeline.editing.covariance import cache_keys, cut_of, entry_path, key_id, second_moments
from pipeline.editing.hparams import HParams
from pipeline.ledger import atomic
from pipeline.models.adapters import adapter_for
from pipeline.stages.common import (Project, StageError, base_model, configured_covariances, corpus, in_processes,
                                    resolve_hparams, user_cache)


def run(project: Project, role: str, layer: int, progress: bool = True) -> str:
    cfg = project.params()
    targets = configured_covariances(cfg)
    if (role, layer) not in targets:
        raise StageError(f"{role}@{layer} is not listed under covariance: in params.yaml")
    _, hp = resolve_hparams(project, cfg, cfg["edit"]["method"])
    processes = cfg["distributed"]["processes"]
    if processes > 1 and not distributed.launched():
        return _in_processes(project, cfg, hp, processes, role, layer, progress)
    lm = base_model(project, distributed.init(cfg["model"]["device"]))
    adapter = adapter_for(lm.model)
    for _, l in targets:
        adapter.check_layer(lm.model, l)
    scratch = user_cache(project, cfg)
    _, ids = second_moments(lm.model, lm.tokenizer, adapter, lm.fingerprint, corpus(project, cfg), targets,
                            cut_of(hp), hp.cov_batch_tokens, hp.cov_dtype, scratch, progress)
    kid = ids[(role, layer)]
    if distributed.is_main():
        dest = entry_path(project.covariance_dir, (role, layer), kid)
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(dest, entry_path(scratch, (role, layer), kid).read_bytes())
    return kid


def _in_processes(project: Project, cfg: dict, hp: HParams, processes: int, role: str, layer: int,
                  progress: bool) -> str:
    """Run this stage under ``torchrun`` in ``processes`` processes; the id of the entry they wrote."""
    args = ["stage", "covariance", "--role", role, "--layer", str(layer)] + ([] if progress else ["--no-progress"])
    in_processes(processes, args, f"covariance {role}@{layer}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(project.model_dir)
    fingerprint = json.loads(project.model_json.read_text())["fingerprint"]
    return _ids(project, cfg, hp, tok, fingerprint, [(role, layer)])[(role, layer)]


def _ids(project: Project, cfg: dict, hp: HParams, tok, fingerprint: str, targets: list[tuple[str, int]]
         ) -> dict[tuple[str, int], str]:
    """The cache ids of ``targets`` under the configured corpus and ``hp``'s cut (the counting pass
    is read from the corpus index when it ran before)."""
    cor, cut = corpus(project, cfg), cut_of(hp)
    keys = cache_keys(fingerprint, cor, cut, summarise(cor, tok, cut), targets, hp.cov_dtype)
    return {t: key_id(k) for t, k in keys.items()}


def cached_covariances(project: Project, lm, targets: list[tuple[str, int]], hp: HParams):
    """The covariances of ``targets`` from ``data/covariance`` — never computed here: a missing one
    is a configuration error (the covariance stages own that folder)."""
    cfg = project.params()
    for (role, layer), kid in _ids(project, cfg, hp, lm.tokenizer, lm.fingerprint, targets).items():
        folder = entry_path(project.covariance_dir, (role, layer), kid).parent
        if not folder.is_dir():
            raise StageError(f"no covariance for {role}@{layer}: {folder} does not exist; add layer {layer} (role "
                             f"{role}) under `covariance:` in params.yaml and run `dvc repro -P`")
        if not entry_path(project.covariance_dir, (role, layer), kid).exists():
            raise StageError(f"{folder} holds a covariance computed with other settings (model, corpus, "
                             "cov_max_length/cov_max_texts/cov_max_tokens or cov_dtype) than this batch's hyper-parameters")
    return second_moments(lm.model, lm.tokenizer, adapter_for(lm.model), lm.fingerprint, corpus(project, cfg), targets,
                          cut_of(hp), hp.cov_batch_tokens, hp.cov_dtype, project.covariance_dir, progress=False)
