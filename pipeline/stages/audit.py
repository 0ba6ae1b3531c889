"""The auditor's questions: ``editledger blame`` (who changed this fact, and what does the model say
now) and the filters of ``editledger log``.

Blame joins the ledger's record of every request that named a subject
(:func:`pipeline.ledger.blame.blame`) with what the active model and the base model answer for
each of those facts now: one forward each over the requested objects
(:func:`pipeline.evaluation.answers.fact_answers`).  The active model is the base model with the
ledger replayed onto it, checked against the recorded fingerprint, as ``materialize`` builds it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd

from pipeline.ledger.blame import BlameRow, blame


def candidates(rows: list[BlameRow]) -> dict[str, list[str]]:
    """Filled-in prompt → every object asked for it (new ones, then the true one), in first-seen order."""
    out: dict[str, list[str]] = {}
    for r in rows:
        seen = out.setdefault(r.prompt, [])
        for c in (r.target_new, r.target_true):
            if c and c not in seen:
                seen.append(c)
    return out


def blame_report(project, subject: str, relation: str | None = None) -> dict:
    """``{"subject", "relation", "entries": [...], "answers": {prompt: {"active", "base"}}}`` for a
    :class:`~pipeline.stages.common.Project`.  (The model code is imported here, not at the top: the
    log filters in this module must not pay for it.)"""
    from pipeline.evaluation.answers import fact_answers
    from pipeline.ledger.replay import materialize
    from pipeline.stages.common import StageError, base_model

    rows = blame(project.ledger, subject, relation)
    if not rows:
        what = f"subject {subject!r}" + (f" with relation {relation!r}" if relation else "")
        raise StageError(f"no batch's requests name {what} (subjects match case-insensitively, as written)")
    facts = candidates(rows)
    lm = base_model(project)
    base = fact_answers(lm.model, lm.tokenizer, facts)
    materialize(project.ledger, None, lm.model, inplace=True)
    active = fact_answers(lm.model, lm.tokenizer, facts)
    return {"subject": subject, "relation": relation, "entries": [r.to_dict() for r in rows],
            "answers": {p: {"active": active[p], "base": base[p]} for p in facts}}


class LogFilterError(ValueError):
    """A filter of ``editledger log`` that cannot be applied (a malformed date)."""


def _date(value: str | None, option: str) -> str | None:
    """``YYYY-MM-DD`` (or a full ISO time) → the ISO prefix compared with ``created_at``."""
    if value is None:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "")).strftime("%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise LogFilterError(f"{option} {value!r} is not a date (use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS)") from None


def filter_log(df: pd.DataFrame, ledger: Path, *, method: str | None = None, status: str | None = None,
               since: str | None = None, until: str | None = None, subject: str | None = None) -> pd.DataFrame:
    """The rows of ``editledger log`` that pass every given filter; ``since``/``until`` bound the
    entry's commit time (inclusive; a date alone means the whole day for ``until``)."""
    lo, hi = _date(since, "--since"), _date(until, "--until")
    if hi is not None and until is not None and len(until) == 10:
        hi = hi[:10] + "T23:59:59"
    keep = pd.Series(True, index=df.index)
    if method is not None:
        keep &= df["method"] == method
    if status is not None:
        keep &= df["status"] == status
    created = df["created_at"].fillna("").str.replace("Z", "", regex=False)
    if lo is not None:
        keep &= (created != "") & (created >= lo)
    if hi is not None:
        keep &= (created != "") & (created <= hi)
    if subject is not None:
        keep &= df["dir"].isin({r.dir for r in blame(ledger, subject)})
    return df[keep]


__all__ = ["LogFilterError", "blame_report", "candidates", "filter_log"]
