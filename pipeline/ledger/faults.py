"""Fault injection at named points of the ledger's write path, for crash and concurrency tests.

The claim that a crash never half-writes an entry is only as good as the crashes tried, and a
``kill -9`` after a random delay rarely lands between two particular system calls.  So the write
path calls :func:`fault_point` at the places where an interruption is most dangerous, and two
environment variables turn a point into a real fault:

``EDITLEDGER_CRASH_AT=<point>``
    the process sends itself ``SIGKILL`` there (no cleanup, no ``finally``, no flush: exactly
    what a power cut or the OOM killer does to the process).
``EDITLEDGER_PAUSE_AT=<point>`` (with ``EDITLEDGER_PAUSE_MARKER=<file>``)
    the process creates ``<file>`` and waits until ``<file>.go`` exists (at most 10 minutes), so a
    test can hold a writer mid-write — with the lock held — while it starts other processes.

Points (``<file>`` is the base name of the file being written, e.g. ``state.json``):

``lock:acquired``         a writer (add/revert/drop) holds the ledger lock, nothing written yet
``tmp:<file>``            the temporary copy of ``<file>`` is written and fsync'ed, not renamed
``renamed:<file>``        ``<file>`` is renamed into place, its directory not yet fsync'ed
``batch:before-rename``   a new batch directory is complete under ``ledger/.tmp-*``, not renamed
``batch:renamed``         it is renamed into place, the ledger directory not yet fsync'ed
``commit:before-state``   an apply wrote ``entry.json`` (and the deltas), not ``state.json``

With neither variable set a point costs two dictionary look-ups, next to an fsync.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

CRASH_ENV = "EDITLEDGER_CRASH_AT"
PAUSE_ENV = "EDITLEDGER_PAUSE_AT"
MARKER_ENV = "EDITLEDGER_PAUSE_MARKER"
PAUSE_LIMIT_S = 600.0


def fault_point(name: str) -> None:
    """Crash or pause here if the environment asks for point ``name`` (see the module docstring)."""
    crash, pause = os.environ.get(CRASH_ENV), os.environ.get(PAUSE_ENV)
    if crash is None and pause is None:
        return
    if crash == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if pause == name:
        _pause(Path(os.environ[MARKER_ENV]))


def _pause(marker: Path) -> None:
    marker.write_text(f"{os.getpid()}\n")
    go = marker.with_name(marker.name + ".go")
    end = time.monotonic() + PAUSE_LIMIT_S
    while not go.exists() and time.monotonic() < end:
        time.sleep(0.02)


__all__ = ["CRASH_ENV", "MARKER_ENV", "PAUSE_ENV", "fault_point"]
