"""The append-only edit ledger: entries, hash chain, atomic append, verify, replay, revert, drop, diff.

Modules, one job each: ``atomic`` (durable writes, canonical JSON, hashes), ``lock`` (single
writer), ``entry`` (schema, ids, manifest), ``chain`` (which deltas are active after each entry),
``weights`` (replaying deltas, fingerprints), ``store`` (the on-disk ledger: read, append),
``verify`` (integrity and bit-exact replay check), ``replay`` (materialize, diff).
"""

from pipeline.ledger.chain import ChainState, PendingDrop
from pipeline.ledger.entry import BASE, Entry, entry_id
from pipeline.ledger.errors import (AlreadyRevertedError, AmbiguousIdError, BaseMismatchError, LedgerCorruptError,
                                    LedgerError, LedgerLockedError, LedgerNotFoundError, NotActiveError,
                                    PendingDropError, StateMismatchError, UnknownEntryError)
from pipeline.ledger.lock import LedgerLock
from pipeline.ledger.replay import LedgerDiff, diff, materialize
from pipeline.ledger.store import (DropResult, active_chain, append_drop, append_edit, append_revert, entries,
                                   incomplete_entries, load_deltas, pending_drop, replay_plan, resolve_ref, show)
from pipeline.ledger.verify import VerifyIssue, VerifyResult, verify

__all__ = [
    "BASE", "AlreadyRevertedError", "AmbiguousIdError", "BaseMismatchError", "ChainState", "DropResult", "Entry",
    "LedgerCorruptError", "LedgerDiff", "LedgerError", "LedgerLock", "LedgerLockedError", "LedgerNotFoundError",
    "NotActiveError", "PendingDrop", "PendingDropError", "StateMismatchError", "UnknownEntryError", "VerifyIssue",
    "VerifyResult", "active_chain", "append_drop", "append_edit", "append_revert", "diff", "entries", "entry_id",
    "incomplete_entries", "load_deltas", "materialize", "pending_drop", "replay_plan", "resolve_ref", "show", "verify",
]
