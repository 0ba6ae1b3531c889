"""The append-only edit ledger: batch directories, entries, hash chain, verify, replay, revert, drop, diff.

Modules, one job each: ``atomic`` (durable writes, canonical JSON, hashes), ``faults`` (crash and
pause injection at named points of the write path, for tests), ``lock`` (single writer), ``layout`` (file and directory names), ``batch`` (add-time inputs of a batch directory:
batch.yaml, requests.parquet, dvc.yaml), ``entry`` (schema, ids, manifest), ``chain`` (which deltas
are active after each entry), ``weights`` (replaying deltas, fingerprints), ``store`` (reading the
committed chain), ``commit`` (what the apply/evaluate stages write), ``append`` (adding batches, and
one-call appends for library use, checkpoints), ``verify`` (integrity and bit-exact replay), ``replay``
(materialize, diff), ``rebase`` (one line of history again after two clones forked it), ``blame``
(which entries named a subject).  See docs/LEDGER.md.

Names are imported on first use (PEP 562), so that reading a ledger (``editledger log``) does not
import torch through the modules that write one (``verify`` is light itself: it imports torch
only to replay).
"""

from importlib import import_module

# imported now: the function shares its module's name, and a lazily imported submodule would take
# that attribute of the package (``pipeline.ledger.verify`` would be the module, not the function)
from pipeline.ledger.verify import verify  # noqa: E402

_EXPORTS = {
    "AlreadyRevertedError": "pipeline.ledger.errors",
    "AmbiguousIdError": "pipeline.ledger.errors",
    "BASE": "pipeline.ledger.entry",
    "BaseMismatchError": "pipeline.ledger.errors",
    "Batch": "pipeline.ledger.batch",
    "BatchError": "pipeline.ledger.batch",
    "ChainState": "pipeline.ledger.chain",
    "DropResult": "pipeline.ledger.append",
    "Entry": "pipeline.ledger.entry",
    "LedgerCorruptError": "pipeline.ledger.errors",
    "LedgerDiff": "pipeline.ledger.replay",
    "LedgerError": "pipeline.ledger.errors",
    "LedgerLock": "pipeline.ledger.lock",
    "LedgerLockedError": "pipeline.ledger.errors",
    "LedgerNotFoundError": "pipeline.ledger.errors",
    "NotActiveError": "pipeline.ledger.errors",
    "PendingDrop": "pipeline.ledger.chain",
    "PendingDropError": "pipeline.ledger.errors",
    "StateMismatchError": "pipeline.ledger.errors",
    "UnknownEntryError": "pipeline.ledger.errors",
    "VerifyIssue": "pipeline.ledger.verify",
    "VerifyResult": "pipeline.ledger.verify",
    "active_chain": "pipeline.ledger.store",
    "add_drop": "pipeline.ledger.append",
    "add_edit": "pipeline.ledger.append",
    "add_revert": "pipeline.ledger.append",
    "append_drop": "pipeline.ledger.append",
    "append_edit": "pipeline.ledger.append",
    "append_revert": "pipeline.ledger.append",
    "commit_drop": "pipeline.ledger.commit",
    "commit_edit": "pipeline.ledger.commit",
    "commit_revert": "pipeline.ledger.commit",
    "diff": "pipeline.ledger.replay",
    "entries": "pipeline.ledger.store",
    "entry_id": "pipeline.ledger.entry",
    "incomplete_entries": "pipeline.ledger.layout",
    "load_deltas": "pipeline.ledger.store",
    "materialize": "pipeline.ledger.replay",
    "pending_drop": "pipeline.ledger.store",
    "read_batch": "pipeline.ledger.batch",
    "read_evaluation": "pipeline.ledger.store",
    "read_requests": "pipeline.ledger.batch",
    "replay_plan": "pipeline.ledger.store",
    "resolve_ref": "pipeline.ledger.store",
    "scan": "pipeline.ledger.layout",
    "show": "pipeline.ledger.store",
    "write_evaluation": "pipeline.ledger.commit",
}

__all__ = [
    "BASE", "AlreadyRevertedError", "AmbiguousIdError", "BaseMismatchError", "Batch", "BatchError", "ChainState",
    "DropResult", "Entry", "LedgerCorruptError", "LedgerDiff", "LedgerError", "LedgerLock", "LedgerLockedError",
    "LedgerNotFoundError", "NotActiveError", "PendingDrop", "PendingDropError", "StateMismatchError",
    "UnknownEntryError", "VerifyIssue", "VerifyResult", "active_chain", "add_drop", "add_edit", "add_revert",
    "append_drop", "append_edit", "append_revert", "commit_drop", "commit_edit", "commit_revert", "diff", "entries",
    "entry_id", "incomplete_entries", "load_deltas", "materialize", "pending_drop", "read_batch", "read_evaluation",
    "read_requests", "replay_plan", "resolve_ref", "scan", "show", "verify", "write_evaluation",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.ledger' has no attribute {name!r}")
