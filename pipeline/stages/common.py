"""What the DVC stages share: the project (:mod:`pipeline.stages.project`), its parameters, the base model.

Root stages run with the repository root as working directory; batch stages run inside their
batch directory ``ledger/<seq>-<hash12>/``, so the root is two levels up.  Everything a stage
reads is either declared in its ``dvc.yaml`` entry or pinned by something that is (the base model
by ``data/model.json``, the history by the parent's ``state.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline import distributed
from pipeline.config import load_params
from pipeline.data import sha256_file
from pipeline.corpus import Corpus, CorpusError
from pipeline.editing.covariance import spectra
from pipeline.editing.hparams import HParams, load_hparams
from pipeline.editing.history import history_of
from pipeline.editing.methods import Method, get_method, sites_of
from pipeline.editing.solvers import SOLVERS
from pipeline.editing.spread import written_projections
from pipeline.editing.targets import anchor_norms
from pipeline.models.adapters import adapter_for
from pipeline.models.loading import GGUF_SOURCES, LoadedModel, cache_home, load_model
from pipeline.stages.project import Project  # noqa: F401  (re-exported: where every stage finds the project)

CORPUS = Path("data/wikitext/wikitext2_raw_test.txt")  # the data stage's verified copy


class StageError(RuntimeError):
    """A stage cannot run with the project as it is; the message says what to do."""


def resolve_hparams(project: Project, cfg: dict, method: str, iterative: bool | None = None,
                    neighbors: int | None = None) -> tuple[Method, HParams]:
    """The method spec and its hyper-parameters as params.yaml configures them (with the
    iterative / neighbour modifiers from the command line, else from params.yaml)."""
    from pipeline.config import modifier_overrides

    spec = get_method(method)
    name = cfg["edit"]["hparams"]
    if Path(name).suffix in (".yaml", ".yml"):
        name = project.path(name)
    return spec, load_hparams(name, spec.hparams_from, modifier_overrides(cfg, iterative, neighbors))


def needed_covariances(spec: Method, hp: HParams) -> list[tuple[str, int]]:
    return written_projections(spec.resolve(hp))


def configured_covariances(cfg: dict) -> list[tuple[str, int]]:
    return [(role, layer) for layer in cfg["covariance"]["layers"] for role in cfg["covariance"]["roles"]]


def check_covariance_config(cfg: dict, spec: Method, hp: HParams) -> None:
    """A batch may only edit (role, layer) pairs whose covariance the pipeline computes."""
    missing = [t for t in needed_covariances(spec, hp) if t not in configured_covariances(cfg)]
    if missing:
        raise StageError(f"method {spec.name} edits {', '.join(f'{r}@{layer}' for r, layer in missing)}, but params.yaml "
                         f"computes covariances only for layers {cfg['covariance']['layers']} and roles "
                         f"{cfg['covariance']['roles']}: add them under `covariance:` (then `dvc repro -P`)")


def model_layers(project: Project, cfg: dict) -> int | None:
    """How many layers the base model has, without loading it: from ``data/model.json`` (the model
    stage's record) or else the ``config.json`` of a local ``model.path``; None if neither exists."""
    try:
        return int(json.loads(project.model_json.read_text())["n_layers"])
    except (OSError, KeyError, TypeError, ValueError):
        pass
    path = cfg["model"]["path"]
    if path is None or path in GGUF_SOURCES:
        return None
    try:
        config = json.loads((project.path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # the model stage reports a missing or broken model directory
    n = config.get("num_hidden_layers", (config.get("text_config") or {}).get("num_hidden_layers"))
    return n if isinstance(n, int) else None


def check_layers(project: Project, cfg: dict, hp: HParams) -> None:
    """Refuse, at add time, hyper-parameters that edit layers the model does not have (the stages
    would only find out after loading the model, and DVC would have a failing batch to carry)."""
    n = model_layers(project, cfg)
    bad = [layer for layer in hp.layers if n is not None and layer >= n]
    if bad:
        raise StageError(f"hyper-parameter layers {list(hp.layers)}: layer(s) {bad} out of range, the base model has "
                         f"layers 0..{n - 1}")


def user_cache(project: Project, cfg: dict) -> Path:
    """The user-level content-keyed cache (``cache_dir``): the covariance stages compute there
    first, and derived statistics (eigen-decompositions) live there, never in the DVC outputs."""
    return project.path(cfg["cache_dir"]) if cfg["cache_dir"] else cache_home() / "covariance"


def corpus(project: Project, cfg: dict) -> Corpus:
    """The configured covariance corpus (params.yaml ``corpus:``; default: the data stage's WikiText copy)."""
    try:
        return Corpus.configured(cfg["corpus"], project.root / CORPUS, project.path)
    except (FileNotFoundError, CorpusError) as exc:
        raise StageError(f"{exc} (the data stage writes the default corpus)") from None


def in_processes(processes: int, args: list[str], what: str) -> None:
    """Run ``editledger ARGS`` (a stage) in ``processes`` processes under ``torchrun``: what the
    covariance and evaluate stages do when ``distributed.processes`` asks for more than one."""
    code = distributed.launch(processes, args)
    if code:
        raise StageError(f"{what} in {processes} processes (torchrun) failed with exit code {code}: a rank stopped "
                         "(its error is above); nothing was written")


def base_model(project: Project, device: str | None = None) -> LoadedModel:
    """The base model materialised by the ``model`` stage, checked against its recorded fingerprint."""
    try:
        info = json.loads(project.model_json.read_text())
    except FileNotFoundError:
        raise StageError(f"no base model at {project.model_dir}: run `dvc repro -P` (stage model) first") from None
    except ValueError:  # not JSON (any more)
        info = None
    if not isinstance(info, dict) or not {"fingerprint", "dtype"} <= set(info):
        raise StageError(f"{project.model_json} is damaged; run `dvc checkout` or `dvc repro -P`")
    for name, sha in info.get("files", {}).items():  # tokenizer and config files (model.json of older runs: none)
        path = project.model_dir / name
        if not path.is_file() or sha256_file(path) != sha:
            raise StageError(f"{path} does not match its sha256 in {project.model_json} (changed after the model "
                             "stage); run `dvc checkout` or `dvc repro -P`")
    lm = load_model(project.model_dir, device=device or project.params()["model"]["device"], dtype=info["dtype"])
    if lm.fingerprint != info["fingerprint"]:
        raise StageError(f"{project.model_dir} does not match the fingerprint in {project.model_json}; "
                         "run `dvc checkout` or `dvc repro -P`")
    return lm


def parent_state(project: Project, parent: str | None, model) -> None:
    """Bring the base ``model`` (in place) to the state after batch directory ``parent``."""
    from pipeline.ledger.replay import materialize

    if parent is not None:
        materialize(project.ledger, parent, model, inplace=True)


@dataclass
class EditBatch:
    """An edit batch opened by a stage: its inputs, and the model in its parent's state."""

    dir: Path
    project: Project
    batch: Any
    spec: Method
    hp: HParams
    requests: list
    lm: LoadedModel
    materialize_s: float
    base_norms: dict[str, float]  # ‖W₀‖ of every parameter the batch writes (the health record's reference)
    anchors: dict[str, torch.Tensor] | None  # norm_anchor: the unedited model's value norms per site


def open_edit_batch(batch_dir: str | Path, stage: str) -> EditBatch:
    """Read an edit batch's inputs, check its covariance configuration, load the base model and
    replay the history up to its parent (checked bit for bit against the recorded fingerprints).
    What the batch needs from the unedited model is read before the replay."""
    import time

    from pipeline.ledger import read_batch, read_requests

    batch_dir = Path(batch_dir).resolve()
    project = Project.of_batch(batch_dir)
    batch = read_batch(batch_dir)
    if batch.kind != "edit":
        raise StageError(f"{batch_dir.name} is a {batch.kind} batch: it has no {stage} stage")
    spec, hp = get_method(batch.method), HParams.from_dict(batch.hparams)
    check_covariance_config(project.params(), spec, hp)
    reqs = read_requests(batch_dir)
    lm = base_model(project)
    adapter = adapter_for(lm.model)
    params = dict(lm.model.named_parameters())
    base_norms = {name: float(params[name].detach().double().norm())
                  for name in (adapter.parameter_name(r, layer) for r, layer in needed_covariances(spec, hp))}
    anchors = anchor_norms(lm.model, lm.tokenizer, adapter, reqs, sites_of(spec.resolve(hp))) if hp.norm_anchor else None
    t0 = time.perf_counter()
    parent_state(project, batch.parent, lm.model)
    return EditBatch(batch_dir, project, batch, spec, hp, reqs, lm, time.perf_counter() - t0, base_norms, anchors)


def edit_history(project: Project, parent: str | None) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """The update rules' history after batch directory ``parent``: ``Σ KᵀK`` of the keys of the
    entries active in that state, in their order (:func:`pipeline.editing.history.history_of`), how
    many entries it covers, and the active entries that kept no keys (written before keys were
    kept: they constrain nothing)."""
    from pipeline.ledger.store import load, load_keys

    if parent is None:
        return {}, 0, []
    chain, states = load(project.ledger, upto=parent)
    by_id = {e.id: e for e in chain}
    kept = [(by_id[eid], load_keys(by_id[eid])) for eid in states[-1].active]
    with_keys = [k for _, k in kept if k is not None]
    return history_of(with_keys), len(with_keys), [e.dirname for e, k in kept if k is None]


@dataclass
class RuleInputs:
    """What the batch's update rule reads besides its own keys and residuals."""

    history: dict[str, torch.Tensor] | None  # Σ KᵀK of the active earlier entries (rules that use it)
    spectra: dict | None  # eigen-decompositions of the covariances (rules that use them)
    history_entries: int = 0  # active earlier entries whose keys are in the history
    history_missing: list[str] = field(default_factory=list)  # active entries that kept no keys


def rule_inputs(eb: EditBatch, covs: dict, ids: dict) -> RuleInputs:
    """The history and spectra the batch's rule needs, derived from the active chain and the
    covariances (cached beside them in the user cache, never in the pipeline's outputs)."""
    rule = SOLVERS[eb.hp.solver]
    history, n, missing = edit_history(eb.project, eb.batch.parent) if rule.uses_history else (None, 0, [])
    spec = spectra(covs, ids, user_cache(eb.project, eb.project.params())) if rule.uses_spectrum else None
    return RuleInputs(history, spec, n, missing)


def write_json(path: Path, doc: Any) -> None:
    """Readable, deterministic JSON (sorted keys), written atomically."""
    from pipeline.ledger.atomic import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def me_ppl_texts(project: Project) -> list[str]:
    """The ME-PPL-50 texts (the data stage's verified ``data/me_ppl_50.parquet``): the collapse
    check of the evaluate stage and the apply stage's guard read the same texts."""
    path = project.data / "me_ppl_50.parquet"
    try:
        texts = pd.read_parquet(path, columns=["Text"])["Text"].tolist()
    except (OSError, KeyError, ValueError) as exc:
        raise StageError(f"{path} is missing or unreadable: run `dvc repro -P` (stage data) first ({exc})") from None
    if not texts:
        raise StageError(f"{path} holds no texts")
    return texts
