"""Edit requests: parsing CounterFact / zsRE records and rejecting bad ones before any work.

A request is a subject, a prompt template with one ``{}`` for the subject, the new object and
(optionally) the old one.  The source record is kept beside it because evaluation needs its
paraphrase and neighbourhood prompts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class RequestError(ValueError):
    """A malformed edit request; the message names the request and the problem."""


@dataclass(frozen=True)
class EditRequest:
    subject: str
    prompt: str  # template with exactly one "{}" standing for the subject
    target_new: str
    target_true: str | None = None
    case_id: Any = None
    relation_id: str | None = None
    fmt: str = "plain"  # "counterfact" | "zsre" | "plain": which evaluation protocol applies
    record: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def canonical(self) -> dict:
        """The fields that define the edit (what the ledger hashes)."""
        return {
            "subject": self.subject,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "target_true": self.target_true,
            "relation_id": self.relation_id,
            "case_id": self.case_id,
        }


def _need_str(rec: dict, key: str, where: str) -> str:
    if key not in rec:
        raise RequestError(f"{where}: missing field {key!r}")
    value = rec[key]
    if not isinstance(value, str):
        raise RequestError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _need_target(obj, where: str, key: str) -> str:
    if isinstance(obj, dict):
        if "str" not in obj:
            raise RequestError(f"{where}: {key} has no 'str'")
        obj = obj["str"]
    if not isinstance(obj, str):
        raise RequestError(f"{where}: {key} must be a string or {{'str': ...}}")
    return obj


def parse_record(rec: Any, index: int = 0) -> EditRequest:
    """One CounterFact, zsRE or plain ``{subject, prompt, target_new}`` record → request."""
    where = f"request {index}"
    if not isinstance(rec, dict):
        raise RequestError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "requested_rewrite" in rec:  # CounterFact
        rw = rec["requested_rewrite"]
        if not isinstance(rw, dict):
            raise RequestError(f"{where}: 'requested_rewrite' must be an object")
        req = EditRequest(
            subject=_need_str(rw, "subject", where),
            prompt=_need_str(rw, "prompt", where),
            target_new=_need_target(rw.get("target_new"), where, "target_new") if "target_new" in rw else _need_str(rw, "target_new", where),
            target_true=_need_target(rw["target_true"], where, "target_true") if "target_true" in rw else None,
            case_id=rec.get("case_id"),
            relation_id=rw.get("relation_id"),
            fmt="counterfact",
            record=rec,
        )
    elif "src" in rec and "alt" in rec:  # zsRE
        subject = _need_str(rec, "subject", where)
        src = _need_str(rec, "src", where)
        if subject and subject not in src:
            raise RequestError(f"{where}: subject {subject!r} not found in the prompt {src!r}")
        answers = rec.get("answers") or []
        req = EditRequest(
            subject=subject,
            prompt=src.replace(subject, "{}", 1),
            target_new=_need_str(rec, "alt", where),
            target_true=answers[0] if answers and isinstance(answers[0], str) else None,
            case_id=rec.get("case_id"),
            fmt="zsre",
            record=rec,
        )
    elif "prompt" in rec:  # plain
        req = EditRequest(
            subject=_need_str(rec, "subject", where),
            prompt=_need_str(rec, "prompt", where),
            target_new=_need_target(rec.get("target_new"), where, "target_new") if "target_new" in rec else _need_str(rec, "target_new", where),
            target_true=_need_target(rec["target_true"], where, "target_true") if rec.get("target_true") is not None else None,
            case_id=rec.get("case_id"),
            relation_id=rec.get("relation_id"),
            record=rec,
        )
    else:
        raise RequestError(
            f"{where}: unrecognised format (expected CounterFact 'requested_rewrite', zsRE 'src'/'alt', "
            "or 'subject'/'prompt'/'target_new')"
        )
    validate_request(req, where)
    return req


def validate_request(req: EditRequest, where: str = "request") -> None:
    if not req.subject.strip():
        raise RequestError(f"{where}: empty subject")
    n = req.prompt.count("{}")
    if n != 1:
        raise RequestError(
            f"{where}: the prompt must contain the subject placeholder '{{}}' exactly once, found {n} in {req.prompt!r}"
        )
    if not req.target_new.strip():
        raise RequestError(f"{where}: empty target_new")
    if req.target_true is not None and req.target_new.strip() == req.target_true.strip():
        raise RequestError(f"{where}: target_new equals target_true ({req.target_new!r}): nothing to edit")


def validate_batch(requests: list[EditRequest]) -> None:
    """Batch-level checks: non-empty, no duplicates, no contradicting requests.

    Two requests contradict each other when they give one prompt two targets, or — with a known
    relation — one (subject, relation) two objects through different prompt templates ("The
    mother tongue of X is" → English, "X's native language is" → German): one batch cannot make
    both true, and the optimisation would silently settle on a compromise.
    """
    if not requests:
        raise RequestError("the batch holds no requests")
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    relations: dict[tuple[str, str], tuple[int, str]] = {}
    for i, r in enumerate(requests):
        key = (r.subject, r.prompt)
        if key in seen:
            j, tgt = seen[key]
            if tgt == r.target_new:
                raise RequestError(f"request {i}: duplicate of request {j} ({r.text!r} -> {r.target_new!r})")
            raise RequestError(
                f"request {i}: conflicts with request {j}: {r.text!r} -> {r.target_new!r} vs {tgt!r}"
            )
        seen[key] = (i, r.target_new)
        if r.relation_id is not None:
            rel = (r.subject, r.relation_id)
            j, tgt = relations.setdefault(rel, (i, r.target_new))
            if tgt.strip() != r.target_new.strip():
                raise RequestError(f"request {i}: conflicts with request {j}: subject {r.subject!r}, relation "
                                   f"{r.relation_id}: {r.target_new!r} vs {tgt!r}")


def parse_requests(data: Any) -> list[EditRequest]:
    if not isinstance(data, list):
        raise RequestError(f"expected a JSON list of requests, got {type(data).__name__}")
    requests = [parse_record(rec, i) for i, rec in enumerate(data)]
    validate_batch(requests)
    return requests


def load_requests(path: str | Path) -> list[EditRequest]:
    """Read a JSON list of CounterFact / zsRE / plain records and validate it."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise RequestError(f"cannot read requests file {p}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise RequestError(f"{p}: not UTF-8 text (byte {exc.start}); a requests file is a JSON list") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"{p}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    return parse_requests(data)


def requests_hash(requests: list[EditRequest]) -> str:
    payload = json.dumps([r.canonical() for r in requests], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()
