"""The append-only edit ledger: batch directories, entries, hash chain, verify, replay, revert, drop, diff.

Modules, one job each: ``atomic`` (durable writes, canonical JSON, hashes), ``faults`` (crash and
pause injection at named points of the write path, for tests), ``lock`` (single writer), ``layout`` (file and directory names), ``batch`` (add-time inputs of a batch directory:
batch.yaml, requests.parquet, dvc.yaml), ``entry`` (schema, ids, manifest), ``chain`` (which deltas
are active after each entry), ``weights`` (replaying deltas, fingerprints), ``store`` (reading the
committed chain), ``commit`` (what the apply/evaluate stages write), ``append`` (adding batches, and
one-call appends for library use), ``verify`` (integrity and bit-exact replay), ``replay``
(materialize, diff).  See docs/LEDGER.md.
"""

from pipeline.ledger.append import (DropResult, add_drop, add_edit, add_revert, append_drop, append_edit,
                                    append_revert)
from pipeline.ledger.batch import Batch, BatchError, read_batch, read_requests
from pipeline.ledger.chain import ChainState, PendingDrop
from pipeline.ledger.commit import commit_drop, commit_edit, commit_revert, write_evaluation
from pipeline.ledger.entry import BASE, Entry, entry_id
from pipeline.ledger.errors import (AlreadyRevertedError, AmbiguousIdError, BaseMismatchError, LedgerCorruptError,
                                    LedgerError, LedgerLockedError, LedgerNotFoundError, NotActiveError,
                                    PendingDropError, StateMismatchError, UnknownEntryError)
from pipeline.ledger.layout import incomplete_entries, scan
from pipeline.ledger.lock import LedgerLock
from pipeline.ledger.replay import LedgerDiff, diff, materialize
from pipeline.ledger.store import (active_chain, entries, load_deltas, pending_drop, read_evaluation, replay_plan,
                                   resolve_ref, show)
from pipeline.ledger.verify import VerifyIssue, VerifyResult, verify

__all__ = [
    "BASE", "AlreadyRevertedError", "AmbiguousIdError", "BaseMismatchError", "Batch", "BatchError", "ChainState",
    "DropResult", "Entry", "LedgerCorruptError", "LedgerDiff", "LedgerError", "LedgerLock", "LedgerLockedError",
    "LedgerNotFoundError", "NotActiveError", "PendingDrop", "PendingDropError", "StateMismatchError",
    "UnknownEntryError", "VerifyIssue", "VerifyResult", "active_chain", "add_drop", "add_edit", "add_revert",
    "append_drop", "append_edit", "append_revert", "commit_drop", "commit_edit", "commit_revert", "diff", "entries",
    "entry_id", "incomplete_entries", "load_deltas", "materialize", "pending_drop", "read_batch", "read_evaluation",
    "read_requests", "replay_plan", "resolve_ref", "scan", "show", "verify", "write_evaluation",
]
