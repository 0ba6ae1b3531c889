"""Durable, all-or-nothing file writes and the canonical byte forms the ledger hashes.

A ledger file must either exist with its full content or not exist at all, even if the process is
killed or the machine loses power mid-write.  Every write therefore goes to a temporary file in the
*same* directory (so the rename cannot cross file systems), is flushed and fsync'ed, renamed over
the final name with ``os.replace`` (atomic on POSIX), and the directory is fsync'ed so that the
rename itself is durable.  ``exclusive=True`` refuses to replace an existing file: the ledger is
append-only and uses it for every entry file (the check is race-free because only the holder of
the writer lock writes).

Canonical JSON (sorted keys, no insignificant whitespace, UTF-8 without escapes, no NaN) makes the
bytes a function of the value, so hashing the bytes hashes the value, and a reader can insist that
a file is byte-for-byte the canonical form of what it parses to.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # only for annotations: readers of a ledger need no torch
    import torch

from pipeline.data import sha256_file  # noqa: F401  (re-exported: the ledger hashes files with it)
from pipeline.ledger.faults import fault_point

# ``.<name>.tmp-<pid>-<8 hex>``: the temporary file of an atomic write by process <pid>.
_TEMP_RE = re.compile(r"^\..+\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


def canonical_json(obj: Any) -> str:
    """One fixed text per JSON value: sorted keys, ``,``/``:`` separators, no NaN/Infinity.

    Non-JSON types raise ``TypeError`` instead of being stringified, so that two different values
    can never hash alike by accident.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_bytes(obj: Any) -> bytes:
    """The file form of a canonical JSON value: its UTF-8 text plus one trailing newline."""
    return canonical_json(obj).encode("utf-8") + b"\n"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 over the canonical JSON text (no trailing newline) — how ids and digests are made."""
    return sha256_bytes(canonical_json(obj).encode("utf-8"))


def fsync_dir(path: str | Path) -> None:
    """fsync a directory so that entries created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dir(path: str | Path) -> Path:
    """Create one new directory (error if it exists) and make its creation durable."""
    p = Path(path)
    os.mkdir(p)
    fsync_dir(p.parent)
    return p


def write_bytes(path: str | Path, data: bytes, *, exclusive: bool = False) -> str:
    """Atomically write ``data`` to ``path``; return its sha256.

    With ``exclusive`` an existing ``path`` raises ``FileExistsError`` and is left untouched.
    A failure at any point leaves no file at ``path`` (or the old one) and removes the temp file.
    """
    p = Path(path)
    if exclusive and os.path.lexists(p):
        raise FileExistsError(f"{p} already exists and ledger files are never replaced")
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"tmp:{p.name}")
        os.replace(tmp, p)
        fault_point(f"renamed:{p.name}")
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(p.parent)
    return sha256_bytes(data)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory: str | Path) -> list[str]:
    """Delete the temporary files that atomic writes of dead processes left in ``directory``.

    A writer killed between writing its temp file and the rename leaves ``.<name>.tmp-<pid>-…``
    behind.  Such a file is never read (readers only open final names), but it would stay as
    clutter forever, so whoever writes into the directory next removes it.  Only files whose
    writer is gone are touched: a live process may be about to rename its file.  (A recycled pid
    keeps a stale file until a later attempt: harmless.)  Returns the names removed.
    """
    removed = []
    for p in Path(directory).iterdir():
        m = _TEMP_RE.match(p.name)
        if m and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def write_text(path: str | Path, text: str, *, exclusive: bool = False) -> str:
    return write_bytes(path, text.encode("utf-8"), exclusive=exclusive)


def write_json(path: str | Path, obj: Any, *, exclusive: bool = False) -> str:
    """Write ``obj`` as canonical JSON (see :func:`canonical_bytes`); return the file's sha256."""
    return write_bytes(path, canonical_bytes(obj), exclusive=exclusive)


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise tensors (moved to CPU, contiguous, unshared) to safetensors bytes.

    The bytes are deterministic for given tensors, so the file hash is a hash of the values.
    """
    from safetensors.torch import save

    clean = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    return save(clean, metadata=metadata)


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                      metadata: dict[str, str] | None = None, *, exclusive: bool = False) -> str:
    """Atomically write a safetensors file; return its sha256."""
    return write_bytes(path, safetensors_bytes(tensors, metadata), exclusive=exclusive)


def write_parquet(path: str | Path, table, *, exclusive: bool = False) -> str:
    """Atomically write a pandas DataFrame or pyarrow Table as Parquet; return the file's sha256."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return write_bytes(path, buf.getvalue(), exclusive=exclusive)


def load_safetensors_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)
