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

Two clones that append in parallel and merge their git histories leave two directories with the
same sequence number: the chain *forks*.  :func:`scan` refuses such a ledger naming both sides
(every reader and writer goes through it); ``editledger rebase`` resolves it by re-appending one
side's batches after the other's and writing ``superseded.json`` into each re-appended original
(:mod:`pipeline.ledger.rebase`).  A superseded directory stays in the ledger, off the main line.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.ledger.errors import LedgerCorruptError, LedgerForkError, LedgerNotFoundError

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

SNAPSHOT_FILE = "snapshot.safetensors"  # checkpoint: the edited weights of the state it records
INDEX_FILE = "index.parquet"  # checkpoint: one row per batch before it (what `log` shows of them)
SUPERSEDED_FILE = "superseded.json"  # written by `editledger rebase` into a batch it re-appended elsewhere
DVCIGNORE_FILE = ".dvcignore"  # ledger/.dvcignore: the batches a checkpoint seals; in a batch directory: its
# stages (superseded before it was computed).  Both hide directories from DVC.

INPUT_FILES = (BATCH_FILE, REQUESTS_FILE, DVC_FILE)
# Files recorded by sha256 in the manifest when present at commit time (inputs + keys_values outputs).
RECORDED_FILES = (*INPUT_FILES, KV_FILE, TRACE_FILE)
# Files that may sit in an entry directory without being listed in its manifest.
UNLISTED_FILES = {STATE_FILE, EVAL_FILE, METRICS_FILE, SUPERSEDED_FILE, DVCIGNORE_FILE, "dvc.lock", ".gitignore"}

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


def scan_all(ledger_dir: str | Path, *, missing_ok: bool = False) -> list[EntryDir]:
    """Every directory that looks like an entry, superseded ones included, by (seq, name)."""
    root = Path(ledger_dir)
    if not root.is_dir():
        if missing_ok:
            return []
        raise LedgerNotFoundError(f"no ledger at {root}")
    out = []
    with os.scandir(root) as it:  # the directory's own listing: no stat per entry (10,000 batches: 10,000 stats)
        for p in it:
            m = DIR_RE.match(p.name)
            if m and p.is_dir():
                out.append(EntryDir(p.name, root / p.name, int(m["seq"]), m["hash"]))
    out.sort(key=lambda d: (d.seq, d.name))
    return out


def superseded_marker(d: EntryDir) -> dict | None:
    """``superseded.json`` of a directory (``{"by": <dir or null>, ...}``), or None on the main line."""
    path = d.path / SUPERSEDED_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LedgerCorruptError(d.name, f"{SUPERSEDED_FILE} is unreadable ({exc})") from None
    if not isinstance(doc, dict) or not (doc.get("by") is None or DIR_RE.match(str(doc.get("by")))):
        raise LedgerCorruptError(d.name, f"{SUPERSEDED_FILE} must name the directory that re-appends it (or null)")
    return doc


def split_lines(dirs: list[EntryDir]) -> tuple[list[EntryDir], list[EntryDir]]:
    """``(main line, superseded)``: a directory is superseded when it holds ``superseded.json``.  Only
    directories that share their number with another are looked at: a rebase re-appends a batch
    after upstream's line, so each original it supersedes shares its number with upstream's."""
    counts = Counter(d.seq for d in dirs)
    main, superseded = [], []
    for d in dirs:
        (superseded if counts[d.seq] > 1 and (d.path / SUPERSEDED_FILE).is_file() else main).append(d)
    return main, superseded


def scan(ledger_dir: str | Path, *, missing_ok: bool = False) -> list[EntryDir]:
    """The main line: entry directories in sequence order, without superseded ones; other names
    (``.lock``, temp dirs) are ignored.

    Sequence numbers must be dense (1, 2, 3, ...).  Two directories with one number are a *fork*
    (two clones appended in parallel and were merged): :class:`LedgerForkError` names them and
    says how to resolve it.  A gap means a directory was removed by hand, which no reader can
    interpret.  A rebase that was interrupted (a superseded batch whose re-appended copy is not
    written yet) must be finished first.
    """
    main, superseded = split_lines(scan_all(ledger_dir, missing_ok=missing_ok))
    root = Path(ledger_dir)
    for d in superseded:
        by = superseded_marker(d)["by"]
        if by is not None and not (root / by).is_dir():
            raise LedgerCorruptError(d.name, f"`editledger rebase` was interrupted (this batch is superseded by {by}, "
                                     "which is not written yet): run `editledger rebase` again to finish it")
    for pos, d in enumerate(main, 1):
        if d.seq == pos - 1:
            fork = [x for x in main if x.seq == d.seq]
            raise LedgerForkError(d.seq, [x.name for x in fork], [describe(x) for x in fork])
        if d.seq != pos:
            raise LedgerCorruptError(d.name, f"sequence number {d.seq} where {pos} was expected "
                                     "(a batch directory is missing)")
    return main


_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> str:
    """The layer number in a parameter name ("model.layers.3.mlp.down_proj.weight" → "3"), else "other"."""
    m = _LAYER_RE.search(name)
    return m.group(1) if m else "other"


def seal_patterns(before_seq: int) -> list[str]:
    """``.dvcignore`` patterns that match exactly the batch directories numbered below ``before_seq``
    (a few digit-prefix globs per digit count: ``/0???-*/``, ``/10[0-3]?-*/`` is ``/100?-*/`` … ``/103?-*/``),
    so that DVC does not even descend into them."""
    out = []
    for width in range(4, max(4, len(str(before_seq - 1))) + 1):
        n, hi = (0 if width == 4 else 10 ** (width - 1)), min(before_seq, 10 ** width)
        while n < hi:
            k = 0
            while n % 10 ** (k + 1) == 0 and n + 10 ** (k + 1) <= hi:
                k += 1
            out.append(f"/{str(n).zfill(width)[:width - k]}{'?' * k}-*/")
            n += 10 ** k
    return out


def last_checkpoint(main: list[EntryDir], upto: str | None = None) -> EntryDir | None:
    """The last computed checkpoint on the main line (at or before directory ``upto``): found from
    the end by its snapshot file, so finding it costs a few file checks, not a read of the ledger."""
    stop = next((i for i, d in enumerate(main) if d.name == upto), len(main) - 1) if upto else len(main) - 1
    for d in reversed(main[: stop + 1]):
        if (d.path / SNAPSHOT_FILE).is_file() and d.committed:
            return d
    return None


def describe(d: EntryDir) -> str:
    """``0002-1a2b3c4d5e6f (entry 9f8e7d6c5b4a)`` — the directory and, once committed, its entry id."""
    try:
        eid = json.loads((d.path / STATE_FILE).read_text(encoding="utf-8"))["id"][:12]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{d.name} ({d.status})"
    return f"{d.name} (entry {eid})"


def incomplete_entries(ledger_dir: str | Path) -> list[str]:
    """Names of batch directories without a committed entry (pending or interrupted)."""
    return [d.name for d in scan(ledger_dir, missing_ok=True) if not d.committed]
