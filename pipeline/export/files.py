"""What both export formats share: the provenance they record and atomic, refuse-to-overwrite output.

An export is all or nothing: it is built under a temporary name beside its destination, fsync'ed,
and only then appears under its own name; on any error the temporary is removed and the
destination was never touched.  An existing destination is refused, never replaced (a non-empty
directory, or for a file any existing path): an export of another state must not silently take
the place of one a server already uses.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from pipeline.ledger.atomic import fsync_dir


class ExportError(ValueError):
    """The state cannot be exported as asked; the message says why and what to do."""


@dataclass(frozen=True)
class Provenance:
    """Which ledger state an export holds; written into every exported file's metadata.

    Only the entry, not the reference that named it ('head', a sequence number, an id prefix): the
    bytes of an export are a function of the entry alone.
    """

    entry_id: str  # the entry whose state this is
    entry_dir: str  # its batch directory
    base_fingerprint: str  # the model the ledger edits
    state_fingerprint: str  # the state itself (the entry's recorded 'after' fingerprint, checked on replay)
    approximate: bool  # the state contains a fast drop (a subtraction), see docs/LEDGER.md

    def to_dict(self) -> dict:
        return asdict(self)

    def metadata(self) -> dict[str, str]:
        """``editledger.<field>`` → text: the form both safetensors and GGUF metadata can hold."""
        return {f"editledger.{k}": str(v).lower() if isinstance(v, bool) else v for k, v in asdict(self).items()}


def check_free(out: Path, *, directory: bool) -> None:
    """Refuse before any work: an export never overwrites (a directory output may be empty)."""
    if directory and (out.is_file() or (out.is_dir() and any(out.iterdir()))):
        raise ExportError(f"{out} exists and is not an empty directory; choose a new path (an export never "
                          "overwrites)")
    if not directory and os.path.lexists(out):
        raise ExportError(f"{out} exists; choose a new path (an export never overwrites)")


def _usual_mode(path: Path, mode: int) -> None:
    """Give a temporary path the permissions a plain ``open``/``mkdir`` would have (``mkstemp`` and
    ``mkdtemp`` make it private to the owner, which would stop a server running as another user)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.iterdir()):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(root)


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` that becomes ``out`` only if the block succeeds."""
    check_free(out, directory=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    _usual_mode(tmp, 0o777)
    try:
        yield tmp
        _fsync_tree(tmp)
        os.replace(tmp, out)  # fails (nothing replaced) if out became a non-empty directory meanwhile
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(out: Path) -> Iterator[Path]:
    """A temporary file beside ``out`` that becomes ``out`` only if the block succeeds.

    The final step is a hard link, not a rename: ``link`` fails if ``out`` appeared meanwhile,
    so not even a race can overwrite someone's file.
    """
    check_free(out, directory=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    _usual_mode(tmp, 0o666)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise ExportError(f"{out} appeared while the export was written; nothing was replaced") from None
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)
