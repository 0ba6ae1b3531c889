"""The entry schema: what an entry *is* (hashed) and what its manifest *records* (checked).

``entry.json`` holds the content that defines an entry; the entry id is the sha256 of its canonical
JSON, so the id changes whenever anything that defines the edit changes: the parent id (which makes
the ids a hash chain), the kind, the canonical requests, the method and hyper-parameters, the
base-model fingerprint, the covariance fingerprints, and for revert/drop the target and mode.  The
deltas are *not* part of the id — they are a result, recorded by hash in the manifest — so a rerun
of the same batch on the same state has the same id even if its floating-point result differs.

Kinds
-----
``edit``    a batch of requests applied with a method (its deltas are stored beside it).
            ``reapplies`` names the entry it re-computes during an exact drop, else null.
``revert``  the active state becomes the state right after ``target`` (or ``"base"``).
``drop``    remove batch ``target`` from the middle.  ``mode="exact"``: the state is reset to the
            part of the history before it and the later batches are recomputed on that state and
            recorded as new edit entries (the plan is listed in ``reapply``).  ``mode="fast"``: its
            delta is subtracted; the result is only approximately the state without it and the
            manifest says ``approximate: true``.
``checkpoint`` changes no weight: it records the state after its parent (``state``: the delta
            operations, so the id pins them) and keeps that state's edited weights and a summary
            of every entry before it beside it, so that readers can start there instead of at the
            first entry (:mod:`pipeline.ledger.checkpoint`).

``state.json`` (the manifest) is written last and makes the entry committed.  It records the id,
sequence number, directory name, the sha256 of every other file of the entry that exists at that
point (the add-time inputs, the keys/values outputs, ``entry.json``, the deltas), weight
fingerprints before and after, library versions, timings, edit diagnostics (``metrics``) and
status (``committed``, or ``refused`` for an edit the collapse guard kept out of the state — see
``guard`` in the content), and ends with ``digest`` = sha256 of its own canonical JSON without
``digest``, so that any change to it is detectable without an outside reference.  ``metrics.json`` (written later by
the evaluate stage) is sealed the same way and names the entry id it evaluates.
"""

from __future__ import annotations

import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.ledger.atomic import canonical_json, sha256_json
from pipeline.ledger.errors import EntrySchemaError

SCHEMA = 1
KINDS = ("edit", "revert", "drop", "checkpoint")
DROP_MODES = ("exact", "fast")
BASE = "base"  # revert target meaning "the base model, no edits"
STATUS_COMMITTED = "committed"
STATUS_REFUSED = "refused"  # an edit the collapse guard refused: recorded, never applied

_ID_RE = re.compile(r"^[0-9a-f]{64}$")
_REQUEST_KEYS = ("subject", "prompt", "target_new", "target_true", "relation_id", "case_id")
_CONTENT_KEYS = {
    "edit": {"schema", "kind", "parent", "base_fingerprint", "requests", "method", "hparams", "covariance_ids",
             "reapplies"},
    "revert": {"schema", "kind", "parent", "base_fingerprint", "target"},
    "drop": {"schema", "kind", "parent", "base_fingerprint", "target", "mode", "reapply"},
    "checkpoint": {"schema", "kind", "parent", "base_fingerprint", "covers", "state"},
}
_MANIFEST_KEYS = {"schema", "id", "seq", "dir", "kind", "parent", "status", "approximate", "active", "files",
                  "deltas", "fingerprints", "versions", "timings", "metrics", "created_at", "digest"}


def is_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_ID_RE.match(value))


# ----------------------------------------------------------------------------------------- content

def canonical_request(req: Any) -> dict:
    """An ``EditRequest`` (anything with ``canonical()``) or a dict → the hashed request fields."""
    data = req.canonical() if hasattr(req, "canonical") else req
    if not isinstance(data, Mapping):
        raise EntrySchemaError(f"a request must be an EditRequest or a dict, got {type(req).__name__}")
    out = {k: data.get(k) for k in _REQUEST_KEYS}
    for k in ("subject", "prompt", "target_new"):
        if not isinstance(out[k], str) or not out[k]:
            raise EntrySchemaError(f"request field {k!r} must be a non-empty string, got {out[k]!r}")
    return out


def canonical_requests(requests: Iterable[Any]) -> list[dict]:
    reqs = [canonical_request(r) for r in requests]
    if not reqs:
        raise EntrySchemaError("an edit entry needs at least one request")
    return reqs


def _plain(obj: Any, what: str) -> Any:
    """Round-trip through canonical JSON: tuples become lists, non-JSON values fail loudly here."""
    import json

    try:
        return json.loads(canonical_json(obj))
    except (TypeError, ValueError) as exc:
        raise EntrySchemaError(f"{what} is not plain JSON: {exc}") from exc


def edit_content(parent: str | None, base_fingerprint: str, requests: Iterable[Any], method: str,
                 hparams: Mapping[str, Any] | Any, covariance_ids: Mapping[str, str] | None,
                 reapplies: str | None = None, guard: Mapping[str, Any] | None = None) -> dict:
    """The hashed content of an edit entry (``hparams`` may be an ``HParams`` or a dict).

    ``guard`` (``{"max_ppl_ratio", "refused"}``) is present only when the collapse guard judged the
    batch: whether it was applied is part of the history, so it is part of the id.  Without it the
    content (and the id) is exactly what it was before the guard existed.
    """
    hp = hparams.to_dict() if hasattr(hparams, "to_dict") else hparams
    content = {
        "schema": SCHEMA, "kind": "edit", "parent": parent, "base_fingerprint": base_fingerprint,
        "requests": canonical_requests(requests), "method": method, "hparams": _plain(dict(hp or {}), "hparams"),
        "covariance_ids": _plain(dict(covariance_ids or {}), "covariance_ids"), "reapplies": reapplies,
    }
    if guard is not None:
        content["guard"] = _plain(dict(guard), "guard")
    validate_content(content)
    return content


def revert_content(parent: str, base_fingerprint: str, target: str) -> dict:
    content = {"schema": SCHEMA, "kind": "revert", "parent": parent, "base_fingerprint": base_fingerprint,
               "target": target}
    validate_content(content)
    return content


def drop_content(parent: str, base_fingerprint: str, target: str, mode: str, reapply: Iterable[str] = ()) -> dict:
    content = {"schema": SCHEMA, "kind": "drop", "parent": parent, "base_fingerprint": base_fingerprint,
               "target": target, "mode": mode, "reapply": list(reapply)}
    validate_content(content)
    return content


def checkpoint_content(parent: str, base_fingerprint: str, covers: int, ops: Iterable[tuple[str, int]]) -> dict:
    """A checkpoint after ``covers`` entries (the main line up to its parent), pinning the state's ops."""
    content = {"schema": SCHEMA, "kind": "checkpoint", "parent": parent, "base_fingerprint": base_fingerprint,
               "covers": covers, "state": [[eid, sign] for eid, sign in ops]}
    validate_content(content)
    return content


def entry_id(content: Mapping[str, Any]) -> str:
    """sha256 over the canonical JSON of the entry content (what ``entry.json`` holds)."""
    return sha256_json(content)


def validate_content(content: Any) -> None:
    """Structural checks of entry content; raises :class:`EntrySchemaError` naming the field."""
    if not isinstance(content, dict):
        raise EntrySchemaError("entry content must be a JSON object")
    kind = content.get("kind")
    if kind not in KINDS:
        raise EntrySchemaError(f"unknown entry kind {kind!r}; expected one of {KINDS}")
    keys = set(content)
    if kind == "edit" and "guard" in keys:
        _validate_guard(content)
        keys = keys - {"guard"}
    if keys != _CONTENT_KEYS[kind]:
        missing, extra = _CONTENT_KEYS[kind] - keys, keys - _CONTENT_KEYS[kind]
        raise EntrySchemaError(f"{kind} entry fields: missing {sorted(missing)}, unexpected {sorted(extra)}")
    if content["schema"] != SCHEMA:
        raise EntrySchemaError(f"unsupported entry schema {content['schema']!r} (this editledger reads {SCHEMA})")
    if content["parent"] is not None and not is_id(content["parent"]):
        raise EntrySchemaError(f"parent must be a 64-hex id or null, got {content['parent']!r}")
    if not isinstance(content["base_fingerprint"], str) or not content["base_fingerprint"]:
        raise EntrySchemaError("base_fingerprint must be a non-empty string")
    if kind == "edit":
        if not isinstance(content["requests"], list) or not content["requests"]:
            raise EntrySchemaError("requests must be a non-empty list")
        for r in content["requests"]:
            if not isinstance(r, dict) or set(r) != set(_REQUEST_KEYS):
                raise EntrySchemaError(f"request must have exactly the fields {_REQUEST_KEYS}")
        if not isinstance(content["method"], str) or not content["method"]:
            raise EntrySchemaError("method must be a non-empty string")
        if not isinstance(content["hparams"], dict):
            raise EntrySchemaError("hparams must be an object")
        cov = content["covariance_ids"]
        if not isinstance(cov, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in cov.items()):
            raise EntrySchemaError("covariance_ids must map strings to strings")
        if content["reapplies"] is not None and not is_id(content["reapplies"]):
            raise EntrySchemaError("reapplies must be an entry id or null")
    elif kind == "revert":
        if content["target"] != BASE and not is_id(content["target"]):
            raise EntrySchemaError(f"revert target must be an entry id or {BASE!r}")
        if content["parent"] is None:
            raise EntrySchemaError("a revert cannot be the first entry")
    elif kind == "checkpoint":
        if content["parent"] is None:
            raise EntrySchemaError("a checkpoint cannot be the first entry")
        if not isinstance(content["covers"], int) or isinstance(content["covers"], bool) or content["covers"] < 1:
            raise EntrySchemaError("checkpoint covers must be a positive number of entries")
        ops = content["state"]
        if not isinstance(ops, list) or not all(isinstance(o, list) and len(o) == 2 and is_id(o[0]) and o[1] in (1, -1)
                                                for o in ops):
            raise EntrySchemaError("checkpoint state must be a list of [entry id, ±1]")
    else:
        if not is_id(content["target"]):
            raise EntrySchemaError("drop target must be an entry id")
        if content["mode"] not in DROP_MODES:
            raise EntrySchemaError(f"drop mode must be one of {DROP_MODES}, got {content['mode']!r}")
        plan = content["reapply"]
        if not isinstance(plan, list) or not all(is_id(x) for x in plan):
            raise EntrySchemaError("reapply must be a list of entry ids")
        if content["mode"] == "fast" and plan:
            raise EntrySchemaError("a fast drop re-applies nothing")
        if content["parent"] is None:
            raise EntrySchemaError("a drop cannot be the first entry")


def _validate_guard(content: dict) -> None:
    g = content["guard"]
    if not isinstance(g, dict) or set(g) != {"max_ppl_ratio", "refused"}:
        raise EntrySchemaError("guard must be an object with exactly max_ppl_ratio and refused")
    r = g["max_ppl_ratio"]
    if not isinstance(r, (int, float)) or isinstance(r, bool) or not r > 0 or not isinstance(g["refused"], bool):
        raise EntrySchemaError("guard.max_ppl_ratio must be a number > 0 and guard.refused a boolean")
    if g["refused"] and content.get("reapplies") is not None:
        raise EntrySchemaError("a re-application batch is never refused by the guard")


# ---------------------------------------------------------------------------------------- manifest

def library_versions() -> dict[str, str | None]:
    """Versions that can change floating-point results, recorded for the audit trail."""
    from importlib import metadata

    import torch

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "safetensors", "editledger"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    if out["editledger"] is None:
        from pipeline import __version__

        out["editledger"] = __version__
    return out


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    return sha256_json({k: v for k, v in manifest.items() if k != "digest"})


def seal(doc: Mapping[str, Any]) -> dict:
    """``doc`` plus ``digest`` = sha256 of its canonical JSON (how state.json and metrics.json end)."""
    out = _plain(dict(doc), "sealed document")
    out["digest"] = manifest_digest(out)
    return out


def content_status(content: Mapping[str, Any]) -> str:
    """``refused`` for an edit the collapse guard refused, else ``committed``."""
    return STATUS_REFUSED if (content.get("guard") or {}).get("refused") else STATUS_COMMITTED


def build_manifest(*, content: Mapping[str, Any], seq: int, dirname: str, files: Mapping[str, str], deltas: dict | None,
                   fingerprints: dict, approximate: bool, active: list[str], timings: Mapping[str, float] | None,
                   metrics: Mapping[str, Any] | None) -> dict:
    """The committed manifest of an entry, sealed with its digest."""
    manifest = {
        "schema": SCHEMA, "id": entry_id(content), "seq": seq, "dir": dirname, "kind": content["kind"],
        "parent": content["parent"],
        "status": content_status(content), "approximate": bool(approximate), "active": active_record(active),
        "files": dict(files),
        "deltas": deltas, "fingerprints": fingerprints, "versions": library_versions(),
        "timings": {k: float(v) for k, v in (timings or {}).items()},
        "metrics": _plain(dict(metrics), "metrics") if metrics is not None else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest["digest"] = manifest_digest(manifest)
    return manifest


def active_record(active: Iterable[str]) -> dict:
    """How a manifest records the entries active after it: their number and the sha256 of the list.
    (Entries written before thousands of batches were considered list the ids themselves; at a
    batch a day that list makes the manifests grow quadratically: 3 GB after 10,000 batches.)"""
    ids = list(active)
    return {"n": len(ids), "sha256": sha256_json(ids)}


def active_matches(recorded: Any, active: Iterable[str]) -> bool:
    """Does a manifest's ``active`` (a list, or :func:`active_record`) record exactly ``active``?"""
    return recorded == (list(active) if isinstance(recorded, list) else active_record(active))


def check_manifest(manifest: Any) -> None:
    """Schema and self-digest of a manifest; raises :class:`EntrySchemaError`."""
    if not isinstance(manifest, dict):
        raise EntrySchemaError("state.json must be a JSON object")
    keys = set(manifest)
    if keys != _MANIFEST_KEYS:
        raise EntrySchemaError(f"state.json fields: missing {sorted(_MANIFEST_KEYS - keys)}, "
                               f"unexpected {sorted(keys - _MANIFEST_KEYS)}")
    if manifest["digest"] != manifest_digest(manifest):
        raise EntrySchemaError("state.json digest does not match its content")
    if manifest["status"] not in (STATUS_COMMITTED, STATUS_REFUSED):
        raise EntrySchemaError(f"status is {manifest['status']!r}, not {STATUS_COMMITTED!r} or {STATUS_REFUSED!r}")
    if not is_id(manifest["id"]) or not isinstance(manifest["seq"], int) or manifest["seq"] < 1:
        raise EntrySchemaError("state.json id/seq malformed")
    if not isinstance(manifest["files"], dict) or not {"entry.json", "batch.yaml"} <= set(manifest["files"]):
        raise EntrySchemaError("state.json lists no entry.json or batch.yaml hash")
    fps = manifest["fingerprints"]
    if not isinstance(fps, dict) or set(fps) != {"before", "after"}:
        raise EntrySchemaError("state.json fingerprints must have 'before' and 'after'")


# ------------------------------------------------------------------------------------------- entry

@dataclass(frozen=True)
class Entry:
    """A committed entry as read from disk (content = entry.json, manifest = state.json)."""

    id: str
    seq: int
    dirname: str
    path: Path
    content: dict
    manifest: dict
    batch: Any = None  # the Batch read from batch.yaml (directory names of parent/target)

    # content
    @property
    def kind(self) -> str:
        return self.content["kind"]

    @property
    def parent(self) -> str | None:
        return self.content["parent"]

    @property
    def base_fingerprint(self) -> str:
        return self.content["base_fingerprint"]

    @property
    def requests(self) -> list[dict]:
        return self.content.get("requests") or []

    @property
    def method(self) -> str | None:
        return self.content.get("method")

    @property
    def hparams(self) -> dict | None:
        return self.content.get("hparams")

    @property
    def covariance_ids(self) -> dict:
        return self.content.get("covariance_ids") or {}

    @property
    def reapplies(self) -> str | None:
        return self.content.get("reapplies")

    @property
    def refused(self) -> bool:
        """An edit the collapse guard refused: recorded with its deltas, never part of a state."""
        return content_status(self.content) == STATUS_REFUSED

    @property
    def target(self) -> str | None:
        return self.content.get("target")

    @property
    def mode(self) -> str | None:
        return self.content.get("mode")

    @property
    def reapply_plan(self) -> tuple[str, ...]:
        return tuple(self.content.get("reapply") or ())

    # manifest
    @property
    def approximate(self) -> bool:
        return bool(self.manifest["approximate"])

    @property
    def active(self) -> list[str] | dict:
        """The active entries as recorded: their ids (older entries) or :func:`active_record`."""
        rec = self.manifest["active"]
        return list(rec) if isinstance(rec, list) else dict(rec)

    @property
    def fingerprints(self) -> dict:
        return self.manifest["fingerprints"]

    @property
    def delta_params(self) -> dict[str, dict]:
        d = self.manifest.get("deltas")
        return dict(d["params"]) if d else {}

    @property
    def metrics(self) -> dict | None:
        return self.manifest.get("metrics")

    @property
    def short(self) -> str:
        return self.id[:12]

    def summary(self) -> dict:
        """What ``editledger show``/``log`` print: content and manifest fields, flattened a little."""
        out = {"seq": self.seq, "id": self.id, "dir": self.dirname, "kind": self.kind, "parent": self.parent,
               "parent_dir": self.batch.parent if self.batch is not None else None,
               "approximate": self.approximate, "active": self.active, "created_at": self.manifest["created_at"]}
        if self.kind == "edit":
            out.update(method=self.method, n_requests=len(self.requests), requests=self.requests,
                       hparams=self.hparams, covariance_ids=self.covariance_ids, reapplies=self.reapplies,
                       deltas=self.delta_params, status=self.manifest["status"], guard=self.content.get("guard"))
        elif self.kind == "checkpoint":
            out.update(covers=self.content["covers"], state=self.content["state"])
        else:
            out.update(target=self.target, target_dir=self.batch.target if self.batch is not None else None)
            if self.kind == "drop":
                out.update(mode=self.mode, reapply=list(self.reapply_plan))
        out.update(fingerprints=self.fingerprints, versions=self.manifest["versions"],
                   timings=self.manifest["timings"], metrics=self.metrics)
        return out
