"""Where things are in a ledger: file names, directory names, and which directories exist.

One directory per entry (= per batch), named ``<seq:04d>-<hash12>``.  ``hash12`` is the first 12
hex digits of the sha256 over the batch's add-time content (see :mod:`pipeline.ledger.batch`), so
the name is known when ``editledger add`` writes the directory, before anything is computed; the
entry *id* (which also covers the parent id and the model/covariance fingerprints) is only known
once the ``apply`` stage has run, and is recorded in ``state.json``.

A directory holds two kinds of files:

* add-time inputs (git-tracked), written once by ``editledger add``/``revert``/``drop``:
  ``batch.yaml``, ``requests.parquet`` (edits only), ``dvc.yaml``;
* stage outputs (DVC-tracked), written by the stages of that ``dvc.yaml``: ``keys_values.parquet``
  and ``trace.parquet`` (stage keys_values), ``entry.json``, ``deltas.safetensors`` and
  ``state.json`` (stage apply; ``state.json`` last: its presence commits the entry),
  ``eval.parquet`` and ``metrics.json`` (stage evaluate).

DVC adds ``dvc.lock`` and ``.gitignore`` beside them; they are DVC's bookkeeping, not ledger files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.ledger.errors import LedgerCorruptError, LedgerNotFoundError

BATCH_FILE = "batch.yaml"
REQUESTS_FILE = "requests.parquet"
DVC_FILE = "dvc.yaml"
KV_FILE = "keys_values.parquet"
TRACE_FILE = "trace.parquet"
ENTRY_FILE = "entry.json"
DELTAS_FILE = "deltas.safetensors"
KEYS_FILE = "keys.safetensors"  # an edit's keys at every layer it wrote (the history of constrained rules)
STATE_FILE = "state.json"
EVAL_FILE = "eval.parquet"
METRICS_FILE = "metrics.json"

INPUT_FILES = (BATCH_FILE, REQUESTS_FILE, DVC_FILE)
# Files recorded by sha256 in the manifest when present at commit time (inputs + keys_values outputs).
RECORDED_FILES = (*INPUT_FILES, KV_FILE, TRACE_FILE)
# Files that may sit in an entry directory without being listed in its manifest.
UNLISTED_FILES = {STATE_FILE, EVAL_FILE, METRICS_FILE, "dvc.lock", ".gitignore"}

DIR_RE = re.compile(r"^(?P<seq>\d{4,})-(?P<hash>[0-9a-f]{12})$")
TMP_PREFIX = ".tmp-"  # temporary directories of an add in progress (ignored by readers and by DVC)

COMMITTED, INTERRUPTED, PENDING = "committed", "interrupted", "pending"


def dirname(seq: int, hash12: str) -> str:
    return f"{seq:04d}-{hash12}"


@dataclass(frozen=True)
class EntryDir:
    """A directory that looks like an entry; ``status`` says how far its stages got."""

    name: str
    path: Path
    seq: int
    hash12: str

    @property
    def committed(self) -> bool:
        return (self.path / STATE_FILE).is_file()

    @property
    def status(self) -> str:
        """``committed`` (state.json written), ``interrupted`` (apply began, never committed) or
        ``pending`` (not applied yet: run ``dvc repro -P``)."""
        if self.committed:
            return COMMITTED
        if (self.path / ENTRY_FILE).exists() or (self.path / DELTAS_FILE).exists():
            return INTERRUPTED
        return PENDING


def scan(ledger_dir: str | Path, *, missing_ok: bool = False) -> list[EntryDir]:
    """Entry directories in sequence order; other names (``.lock``, temp dirs) are ignored.

    Sequence numbers must be dense and unique (1, 2, 3, ...): a gap or a duplicate means a
    directory was removed or copied in by hand, which no reader can interpret.
    """
    root = Path(ledger_dir)
    if not root.is_dir():
        if missing_ok:
            return []
        raise LedgerNotFoundError(f"no ledger at {root}")
    out = []
    for p in root.iterdir():
        m = DIR_RE.match(p.name)
        if m and p.is_dir():
            out.append(EntryDir(p.name, p, int(m["seq"]), m["hash"]))
    out.sort(key=lambda d: (d.seq, d.name))
    for pos, d in enumerate(out, 1):
        if d.seq != pos:
            raise LedgerCorruptError(d.name, f"sequence number {d.seq} where {pos} was expected "
                                     "(a batch directory is missing or duplicated)")
    return out


def incomplete_entries(ledger_dir: str | Path) -> list[str]:
    """Names of batch directories without a committed entry (pending or interrupted)."""
    return [d.name for d in scan(ledger_dir, missing_ok=True) if not d.committed]
