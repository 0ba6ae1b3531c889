"""Exceptions of the ledger, one class per situation a caller (or the CLI) must tell apart.

They all derive from :class:`LedgerError` so a command line can catch one type, print the message
and exit non-zero; the messages name the entry and say what to do.
"""

from __future__ import annotations


class LedgerError(RuntimeError):
    """Base class: something about the ledger prevents the operation."""


class LedgerNotFoundError(LedgerError):
    """The ledger directory does not exist (readers never create it)."""


class LedgerLockedError(LedgerError):
    """Another writer holds the ledger's exclusive lock."""

    def __init__(self, path: str, pid: int | None):
        self.path = path
        self.pid = pid
        who = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"the ledger is locked by {who} (lock file {path}); wait for it to finish "
                         "(readers such as log/show/verify do not need the lock)")


class LedgerCorruptError(LedgerError):
    """A committed entry fails its checks (hashes, canonical form, parent chain, structure)."""

    def __init__(self, dirname: str, reason: str, entry_id: str | None = None):
        self.dirname = dirname
        self.reason = reason
        self.entry_id = entry_id
        super().__init__(f"ledger entry {dirname}: {reason}")


class LedgerForkError(LedgerCorruptError):
    """Two batch directories with one sequence number: two clones appended in parallel and merged."""

    def __init__(self, seq: int, dirs: list[str], described: list[str]):
        self.dirs = list(dirs)
        names = " and ".join(described)
        super().__init__(dirs[0], f"the ledger forks at batch {seq:04d}: {names} both take that place "
                         "(two clones appended in parallel and their histories were merged); keep one line: "
                         "`editledger rebase` keeps upstream's batches and re-appends this clone's after them "
                         "(docs/LEDGER.md, 'Working together')")


class EntrySchemaError(LedgerError):
    """Entry content or manifest does not follow the schema."""


class UnknownEntryError(LedgerError, KeyError):
    """No committed entry matches the reference."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AmbiguousIdError(LedgerError):
    """An id prefix matches more than one entry."""


class AlreadyRevertedError(LedgerError):
    """A revert whose target state is already active, or was itself reverted/dropped away."""


class NotActiveError(LedgerError):
    """A drop of an entry that is not part of the active state."""


class PendingDropError(LedgerError):
    """An exact drop is still re-applying later batches; finish it (or revert) first."""


class StateMismatchError(LedgerError):
    """The model handed to a writer is not in the state the ledger says is active."""


class BaseMismatchError(LedgerError):
    """The base-model fingerprint differs from the one the ledger was started with."""
