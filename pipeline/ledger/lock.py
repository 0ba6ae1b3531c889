"""The single-writer lock of a ledger directory.

Two writers appending at once would both pick the same sequence number and parent and fork the hash
chain, so every append holds an exclusive ``fcntl.flock`` on ``<ledger>/.lock``.  ``flock`` is
released by the kernel when the holder dies (even on ``kill -9``), so a crashed writer never leaves
a stale lock behind.  The lock is non-blocking: a second writer fails at once with
:class:`LedgerLockedError` naming the holder's pid (written into the lock file; looked for again
for a moment if the holder has not written it yet).  Readers never take
the lock: they only look at committed entries, which appear atomically.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from pipeline.ledger.errors import LedgerLockedError
from pipeline.ledger.faults import fault_point

LOCK_FILE = ".lock"
# How long a refused writer looks for the holder's pid (written microseconds after its flock).
HOLDER_WAIT_S = 2.0

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
            self._lock_or_name_holder(fd)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        fault_point("lock:acquired")
        return self

    def _lock_or_name_holder(self, fd: int) -> None:
        """Take the lock, or raise naming the holder.

        The holder writes its pid just after ``flock`` and empties the file just before unlocking,
        so a refused writer can land in either window and read an empty file.  Rather than answer
        "another process", it looks again for up to :data:`HOLDER_WAIT_S`: either the pid appears
        or the holder is gone and this writer takes the lock after all (still never two writers).
        """
        deadline = time.monotonic() + HOLDER_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pid = lock_holder(self.ledger_dir)
                if pid is not None or time.monotonic() >= deadline:
                    raise LedgerLockedError(str(self.path), pid) from None
                time.sleep(0.01)

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
