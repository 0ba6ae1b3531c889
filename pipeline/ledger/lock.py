"""The single-writer lock of a ledger directory.

Two writers appending at once would both pick the same sequence number and parent and fork the hash
chain, so every append holds an exclusive ``fcntl.flock`` on ``<ledger>/.lock``.  ``flock`` is
released by the kernel when the holder dies (even on ``kill -9``), so a crashed writer never leaves
a stale lock behind.  The lock is non-blocking: a second writer fails at once with
:class:`LedgerLockedError` naming the holder's pid (written into the lock file).  Readers never take
the lock: they only look at committed entries, which appear atomically.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pipeline.ledger.errors import LedgerLockedError
from pipeline.ledger.faults import fault_point

LOCK_FILE = ".lock"

__all__ = ["LOCK_FILE", "LedgerLock", "LedgerLockedError", "lock_holder"]


def lock_holder(ledger_dir: str | Path) -> int | None:
    """The pid recorded by the current (or last) holder, if readable; for messages only."""
    try:
        text = (Path(ledger_dir) / LOCK_FILE).read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class LedgerLock:
    """Exclusive, non-blocking writer lock; use as a context manager.

    Each instance opens its own file description, so two instances in one process exclude each
    other just like two processes do.  An instance is not re-entrant.
    """

    def __init__(self, ledger_dir: str | Path):
        self.ledger_dir = Path(ledger_dir)
        self.path = self.ledger_dir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> LedgerLock:
        if self._fd is not None:
            raise RuntimeError("this LedgerLock is already held (locks are not re-entrant)")
        self.ledger_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerLockedError(str(self.path), lock_holder(self.ledger_dir)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        fault_point("lock:acquired")
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Forget the pid before unlocking: a writer that finished (or was refused) leaves the
            # lock file as it found it, so a refused command changes no file at all.
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> LedgerLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
