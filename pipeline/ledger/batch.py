"""A batch directory's add-time inputs: ``batch.yaml``, ``requests.parquet`` and its stage file.

``batch.yaml`` says *what* the entry is, in terms known before any computation: its sequence
number, its parent *directory*, its kind, and for an edit the method, the fully resolved
hyper-parameters, the engine and the seed; for a revert/drop its target directory (and mode).  A
batch that ``editledger rebase`` re-appended names the original it ``supersedes`` (absent
otherwise, so that batches written before rebasing existed keep their names and hashes).
References between batches are directory names, not entry ids, so that a changed batch upstream
(a different history, see docs/LEDGER.md) can be recomputed by DVC without rewriting them; the
``apply`` stage resolves them to ids and records those in ``entry.json``.

``requests.parquet`` keeps each request's full source record (as JSON) next to its canonical
fields, because evaluation needs the paraphrase and neighbourhood prompts.

The stage file (``dvc.yaml``: how the pipeline computes the batch) is the caller's: the ledger
stores it like the other inputs but does not know what the stages are (``stage_file`` of the
writing functions; :func:`pipeline.stages.dvcfile.batch_dvc_yaml` is the pipeline's).

The directory is created atomically: everything is written and fsync'ed in a temporary directory
inside the ledger, which is then renamed into place.  A crash leaves at most an ignored
``.tmp-*`` directory (removed by the next writer), never a half-written batch.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import yaml

from pipeline.requests import EditRequest, parse_requests
from pipeline.ledger import atomic
from pipeline.ledger.entry import BASE, DROP_MODES, KINDS
from pipeline.ledger.errors import LedgerError
from pipeline.ledger.faults import fault_point
from pipeline.ledger.layout import BATCH_FILE, DIR_RE, DVC_FILE, REQUESTS_FILE, TMP_PREFIX, dirname

_KIND_FIELDS = {
    "edit": ("method", "engine", "seed", "hparams", "reapplies"),
    "revert": ("target",),
    "drop": ("target", "mode", "reapply"),
    "checkpoint": (),
}
_HEADER = {
    "edit": "# A batch of edit requests (requests.parquet), applied by the stages in dvc.yaml.\n",
    "revert": "# A revert: the active state becomes the state right after `target` (or the base model).\n",
    "drop": "# A drop: batch `target` leaves the active state (mode exact: the batches listed in `reapply`\n"
            "# are recomputed by the re-application batches that follow; mode fast: its delta is subtracted).\n",
    "checkpoint": "# A checkpoint: the state after `parent`, kept whole so that readers start here; changes no weight.\n",
}
_FOOTER = ("# Written by editledger; the ledger never rewrites it.  Editing it by hand makes a different\n"
           "# history: `dvc repro -P` then recomputes this batch and every later one (docs/LEDGER.md).\n")


StageFile = Callable[["Batch"], str]  # the text of a batch's stage file (dvc.yaml), from its batch.yaml


class BatchError(LedgerError):
    """``batch.yaml`` or ``requests.parquet`` is malformed."""


@dataclass(frozen=True)
class Batch:
    seq: int
    kind: str
    parent: str | None  # directory name of the previous batch (None for the first)
    method: str | None = None
    engine: str | None = None
    seed: int | None = None
    hparams: dict | None = None
    reapplies: str | None = None  # edit: directory of the batch it recomputes during an exact drop
    target: str | None = None  # revert: directory or "base"; drop: directory
    mode: str | None = None  # drop: exact | fast
    reapply: tuple[str, ...] = field(default=())  # exact drop: directories of the batches to recompute
    supersedes: str | None = None  # rebase: the directory of the batch this one re-appends (any kind)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise BatchError(f"unknown batch kind {self.kind!r}; expected one of {KINDS}")
        if not isinstance(self.seq, int) or isinstance(self.seq, bool) or self.seq < 1:
            raise BatchError(f"seq must be an integer ≥ 1, got {self.seq!r}")
        if self.supersedes is not None and not _is_dir(self.supersedes):
            raise BatchError(f"supersedes must be a batch directory name or absent, got {self.supersedes!r}")
        if self.parent is not None and not _is_dir(self.parent):
            raise BatchError(f"parent must be a batch directory name or null, got {self.parent!r}")
        if (self.parent is None) != (self.seq == 1):
            raise BatchError("only the first batch (seq 1) has no parent")
        if self.kind == "edit":
            if not isinstance(self.method, str) or not self.method:
                raise BatchError("an edit batch needs a method")
            if not isinstance(self.hparams, dict) or not self.hparams.get("layers"):
                raise BatchError("an edit batch needs resolved hyper-parameters (with layers)")
            if self.engine not in ("fast", "reference"):
                raise BatchError(f"engine must be fast or reference, got {self.engine!r}")
            if not isinstance(self.seed, int) or isinstance(self.seed, bool):
                raise BatchError(f"seed must be an integer, got {self.seed!r}")
            if self.reapplies is not None and not _is_dir(self.reapplies):
                raise BatchError(f"reapplies must be a batch directory name or null, got {self.reapplies!r}")
        elif self.parent is None:
            raise BatchError(f"a {self.kind} cannot be the first batch")
        elif self.kind == "checkpoint":
            pass  # only a parent: what it records is the state after it
        elif self.kind == "revert":
            if self.target != BASE and not _is_dir(self.target):
                raise BatchError(f"revert target must be a batch directory name or {BASE!r}, got {self.target!r}")
        else:
            if not _is_dir(self.target):
                raise BatchError(f"drop target must be a batch directory name, got {self.target!r}")
            if self.mode not in DROP_MODES:
                raise BatchError(f"drop mode must be one of {DROP_MODES}, got {self.mode!r}")
            if not all(_is_dir(x) for x in self.reapply) or (self.mode == "fast" and self.reapply):
                raise BatchError("reapply must list batch directories (and be empty for a fast drop)")

    # ------------------------------------------------------------------------------- identity

    def identity(self, canonical_requests: list[dict] | None) -> dict:
        """The add-time content that names the directory (everything but seq and parent)."""
        doc = {"kind": self.kind, **{k: _plain(getattr(self, k)) for k in _KIND_FIELDS[self.kind]}}
        if self.kind == "edit":
            doc["requests"] = canonical_requests
        if self.supersedes is not None:
            doc["supersedes"] = self.supersedes
        return doc

    def hash12(self, canonical_requests: list[dict] | None) -> str:
        return atomic.sha256_json(self.identity(canonical_requests))[:12]

    def dirname(self, canonical_requests: list[dict] | None) -> str:
        return dirname(self.seq, self.hash12(canonical_requests))

    # ----------------------------------------------------------------------------- yaml form

    def to_doc(self) -> dict:
        doc = {"seq": self.seq, "kind": self.kind, "parent": self.parent}
        doc.update({k: _plain(getattr(self, k)) for k in _KIND_FIELDS[self.kind]})
        if self.supersedes is not None:
            doc["supersedes"] = self.supersedes
        return doc

    def to_yaml(self) -> str:
        body = yaml.safe_dump(self.to_doc(), sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)
        return _HEADER[self.kind] + _FOOTER + body

    @classmethod
    def from_doc(cls, doc: Any) -> Batch:
        if not isinstance(doc, dict):
            raise BatchError("batch.yaml must hold a mapping")
        kind = doc.get("kind")
        if kind not in _KIND_FIELDS:
            raise BatchError(f"unknown batch kind {kind!r}; expected one of {tuple(_KIND_FIELDS)}")
        allowed = {"seq", "kind", "parent", *_KIND_FIELDS[kind]}
        extra = sorted(set(doc) - allowed - {"supersedes"})
        missing = sorted(allowed - set(doc))
        if extra or missing:
            raise BatchError(f"{kind} batch fields: missing {missing}, unexpected {extra}")
        values = dict(doc)
        if kind == "drop":
            values["reapply"] = tuple(values["reapply"] or ())
        try:
            return cls(**values)
        except TypeError as exc:
            raise BatchError(str(exc)) from None


def _is_dir(name: Any) -> bool:
    return isinstance(name, str) and bool(DIR_RE.match(name))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------- reading

def read_batch(batch_dir: str | Path) -> Batch:
    """Parse and validate ``batch.yaml``; its ``seq`` must match the directory name."""
    d = Path(batch_dir)
    try:
        doc = yaml.safe_load((d / BATCH_FILE).read_text(encoding="utf-8"))
    except OSError as exc:
        raise BatchError(f"{d.name}: cannot read {BATCH_FILE}: {exc.strerror or exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BatchError(f"{d.name}: {BATCH_FILE} is not valid YAML: {exc}") from None
    try:
        batch = Batch.from_doc(doc)
    except BatchError as exc:
        raise BatchError(f"{d.name}: {BATCH_FILE}: {exc}") from None
    m = DIR_RE.match(d.name)
    if m and int(m["seq"]) != batch.seq:
        raise BatchError(f"{d.name}: {BATCH_FILE} says seq {batch.seq}, the directory name says {int(m['seq'])}")
    return batch


def requests_frame(requests: Sequence[EditRequest]) -> pd.DataFrame:
    """One row per request: canonical fields (readable), canonical JSON, and the full source record."""
    rows = []
    for i, r in enumerate(requests):
        c = r.canonical()
        rows.append({"index": i, "subject": r.subject, "prompt": r.prompt, "target_new": r.target_new,
                     "target_true": r.target_true, "relation_id": r.relation_id, "format": r.fmt,
                     "canonical": atomic.canonical_json(c), "record": atomic.canonical_json(r.record or c)})
    return pd.DataFrame(rows)


def read_requests(batch_dir: str | Path) -> list[EditRequest]:
    """The requests of an edit batch, re-parsed from their source records (and checked against
    their canonical form, so a hand-edited record cannot silently change what is edited)."""
    d = Path(batch_dir)
    try:
        df = pd.read_parquet(d / REQUESTS_FILE)
        records = [json.loads(x) for x in df["record"]]
        canonical = [json.loads(x) for x in df["canonical"]]
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise BatchError(f"{d.name}: cannot read {REQUESTS_FILE}: {exc}") from None
    requests = parse_requests(records)
    if [r.canonical() for r in requests] != canonical:
        raise BatchError(f"{d.name}: {REQUESTS_FILE}: the records do not match their canonical fields")
    return requests


# ---------------------------------------------------------------------------------------- writing

def write_batch_dir(ledger_dir: str | Path, batch: Batch, requests: Sequence[EditRequest] | None = None,
                    stage_file: StageFile | None = None) -> Path:
    """Create ``ledger/<seq>-<hash12>/`` with its inputs, atomically (with ``stage_file``'s text as
    ``dvc.yaml``; without it, a batch committed in-process has none).  The caller holds the lock."""
    if (batch.kind == "edit") != (requests is not None):
        raise BatchError("an edit batch needs its requests; revert/drop batches have none")
    ledger = Path(ledger_dir)
    canonical = [r.canonical() for r in requests] if requests is not None else None
    final = ledger / batch.dirname(canonical)
    if final.exists():
        raise LedgerError(f"{final} already exists and ledger directories are never replaced")
    ledger.mkdir(parents=True, exist_ok=True)
    remove_abandoned_tmp_dirs(ledger)
    tmp = ledger / f"{TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
    atomic.make_dir(tmp)
    try:
        atomic.write_text(tmp / BATCH_FILE, batch.to_yaml())
        if requests is not None:
            atomic.write_parquet(tmp / REQUESTS_FILE, requests_frame(requests))
        if stage_file is not None:
            atomic.write_text(tmp / DVC_FILE, stage_file(batch))
        atomic.fsync_dir(tmp)
        fault_point("batch:before-rename")
        os.rename(tmp, final)
        fault_point("batch:renamed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.fsync_dir(ledger)
    return final


def remove_abandoned_tmp_dirs(ledger_dir: str | Path) -> list[str]:
    """Delete ``ledger/.tmp-*`` directories: with the writer lock held (the caller's duty) they can
    only be left over from a writer that was killed before its rename.  Readers ignore them anyway;
    this keeps a ledger that survived crashes free of clutter."""
    removed = []
    for p in Path(ledger_dir).iterdir():
        if p.name.startswith(TMP_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


__all__ = ["Batch", "BatchError", "StageFile", "read_batch", "read_requests", "remove_abandoned_tmp_dirs",
           "requests_frame", "write_batch_dir"]
