"""The covariance corpus: any local ``datasets`` source, streamed as texts and cut into token windows.

The key covariance of MEMIT and PMET is taken over 100k Wikipedia articles; such a corpus does not
fit in memory as one string, so it is read as a stream (``datasets`` streaming, or a memory-mapped
saved dataset) and only the window being filled is held: memory does not grow with the corpus.

Sources (:meth:`Corpus.open`):

* a text file (``.txt``): one text per line — the bundled WikiText-2 sample, the default;
* Parquet, JSON Lines (``.jsonl``/``.json``) or CSV files, or text files: one file or a directory
  of files of one format, the text in the column ``text_column``;
* a directory written by ``Dataset.save_to_disk`` (of a ``DatasetDict``: with ``split``);
* ``hub:NAME``, a Hugging Face Hub dataset, where a network exists (pinned to the commit it
  resolves to; the prefix keeps a mistyped path from becoming a network look-up).

**The cut** (:func:`windows`).  Texts are stripped and empty ones skipped; the texts are joined by
``"\n"`` into one token stream, which is cut into consecutive windows of ``max_length`` tokens (the
tokenizer's BOS token first where it adds one), the last one shorter.  To stream, each text is
tokenised on its own with the separator attached (``text + "\n"``; the last text without), in
blocks of :data:`BLOCK_TEXTS` texts per tokenizer call.  For SmolLM2's tokenizer (byte-level BPE
that splits at line breaks before merging) this gives exactly the tokens of the whole joined text,
which is what the earlier reader tokenised — so the default covariance keeps its cache key and its
bits.  For a text file the counting pass checks this on the file's first 4 MiB; where it does not
hold, the cache key says that texts were tokenised one by one (:func:`key_fields`), so an entry of
the earlier reader is never taken for it.  ``max_texts`` keeps the first texts, ``max_tokens`` the
first tokens of the stream.

**Fingerprint** (:attr:`Corpus.sha256`): the content, never the path: a single file's sha256 (what
the earlier reader keyed on), over several files the sha256 of their names and hashes, for a saved
dataset that of its Arrow files, for a Hub dataset its name and commit.

**Counting pass** (:func:`summarise`): a cache key names the number of tokens and windows (as it
always did), so they are counted before anything is looked up: one tokenisation of the corpus,
which records every block's token count and sha256, remembered in a small index
(``<cache>/corpus/``, ``$EDITLEDGER_CORPUS_INDEX``; ``off``: none) keyed by the corpus fingerprint,
the tokenizer and the cut.  With the block counts a rank of a sharded pass knows where its batches'
tokens lie and tokenises only those blocks (:func:`shard_batches`), checking each against its
sha256; under ``torchrun`` the counting pass itself is shared out block by block.  Every rank still
reads every text (reading is cheap next to tokenising).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline import distributed
from pipeline.data import sha256_file

FORMATS = {".txt": "text", ".text": "text", ".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
SEPARATOR = "\n"
BLOCK_TEXTS = 1000  # texts per block: one tokenizer call (batched in Rust), one unit of sharding and checksums
JOINED_CHECK_CHARS = 4 << 20  # how much of a text file is compared with its whole-text tokenisation
INDEX_FORMAT = 2
HUB_PREFIX = "hub:"
T = TypeVar("T")


class CorpusError(ValueError):
    """The corpus cannot be read as asked (missing, empty, unknown format, no such column)."""


def _manifest_sha256(root: Path, files: list[Path]) -> str:
    lines = "".join(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


@dataclass(frozen=True)
class Corpus:
    """A corpus source: where it is, how to read it, and the fingerprint of its content."""

    location: str  # a path, or a Hub dataset name
    reader: str  # text | parquet | json | csv | saved | hub
    files: tuple[str, ...]  # the data files, in reading order (none for saved / hub)
    text_column: str
    split: str | None
    config: str | None
    sha256: str
    revision: str | None = None  # hub: the commit

    @property
    def path(self) -> Path:
        return Path(self.location)

    @classmethod
    def from_file(cls, path: str | Path) -> Corpus:
        """A single text file, one text per line (the earlier reader's only source)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"covariance corpus {p} does not exist")
        return cls(str(p), "text", (str(p),), "text", None, None, sha256_file(p))

    @classmethod
    def open(cls, location: str | Path, text_column: str = "text", split: str | None = None,
             config: str | None = None) -> Corpus:
        """Any source of the module docstring.  Reads nothing but what the fingerprint needs."""
        p = Path(location).expanduser()
        if p.is_file():
            fmt = FORMATS.get(p.suffix.lower())
            if fmt is None:
                raise CorpusError(f"covariance corpus {p}: unknown format {p.suffix!r}; use one of "
                                  f"{', '.join(sorted(FORMATS))}, a saved dataset directory or a directory of such files")
            if fmt == "text":
                return cls.from_file(p)
            return cls(str(p), fmt, (str(p),), text_column, None, None, sha256_file(p))
        if p.is_dir():
            return cls._directory(p, text_column, split)
        if str(location).startswith(HUB_PREFIX):
            return cls._hub(str(location)[len(HUB_PREFIX):], text_column, split, config)
        raise FileNotFoundError(f"covariance corpus {p} does not exist (a Hub dataset is named {HUB_PREFIX}NAME)")

    @classmethod
    def _directory(cls, p: Path, text_column: str, split: str | None) -> Corpus:
        if (p / "dataset_dict.json").exists():  # DatasetDict.save_to_disk: one folder per split
            splits = json.loads((p / "dataset_dict.json").read_text())["splits"]
            if split not in splits:
                raise CorpusError(f"covariance corpus {p} is a dataset with splits {', '.join(splits)}: "
                                  f"set corpus.split (got {split!r})")
            return cls._saved(p / split, str(p), text_column, split)
        if (p / "state.json").exists():
            return cls._saved(p, str(p), text_column, None)
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FORMATS)
        kinds = {FORMATS[f.suffix.lower()] for f in files}
        if not files:
            raise CorpusError(f"covariance corpus {p}: no data files ({', '.join(sorted(FORMATS))}) and not a saved dataset")
        if len(kinds) > 1:
            raise CorpusError(f"covariance corpus {p} mixes formats ({', '.join(sorted(kinds))}); keep one per directory")
        kind = kinds.pop()
        return cls(str(p), kind, tuple(map(str, files)), "text" if kind == "text" else text_column, None, None,
                   _manifest_sha256(p, files))

    @classmethod
    def _saved(cls, folder: Path, location: str, text_column: str, split: str | None) -> Corpus:
        state = json.loads((folder / "state.json").read_text())
        arrows = [folder / f["filename"] for f in state["_data_files"]]
        return cls(location, "saved", (), text_column, split, None, _manifest_sha256(folder, arrows))

    @classmethod
    def _hub(cls, name: str, text_column: str, split: str | None, config: str | None) -> Corpus:
        from huggingface_hub import HfApi

        try:
            commit = HfApi().dataset_info(name).sha
        except Exception as exc:  # offline, unknown name, no access: huggingface_hub raises several types
            raise CorpusError(f"covariance corpus {name!r} is neither a local path nor a reachable Hub dataset ({exc})") from exc
        fp = hashlib.sha256(f"{name}\0{config}\0{split}\0{commit}".encode()).hexdigest()
        return cls(name, "hub", (), text_column, split or "train", config, fp, commit)

    @classmethod
    def configured(cls, section: dict[str, Any], default: Path, resolve: Callable[[str], Path] = Path) -> Corpus:
        """The ``corpus:`` section of params.yaml: its ``path`` (resolved by ``resolve``, e.g. against the
        project root; a ``hub:`` name as it is), else ``default``."""
        value = section["path"]
        location = default if value is None else value if value.startswith(HUB_PREFIX) else resolve(value)
        return cls.open(location, section["text_column"], section["split"], section["config"])

    def describe(self) -> dict[str, Any]:
        """How the source is read, for cache keys (the fingerprint covers the content)."""
        return {"reader": self.reader, "text_column": self.text_column, "split": self.split, "config": self.config}

    @property
    def plain_text_file(self) -> bool:
        """One text file: the source the earlier reader took, whose cache keys stay as they were."""
        return self.reader == "text" and len(self.files) == 1 and self.files[0] == self.location

    def rows(self) -> Iterator[Any]:
        """The raw values of the text column, streamed in file order."""
        import datasets

        if self.reader == "saved":
            folder = self.path / self.split if self.split else self.path
            ds = datasets.load_from_disk(str(folder))  # memory-mapped: nothing is loaded up front
        elif self.reader == "hub":
            ds = datasets.load_dataset(self.location, self.config, split=self.split, streaming=True,
                                       revision=self.revision)
        else:
            ds = datasets.load_dataset(self.reader, data_files=list(self.files), split="train", streaming=True)
        if ds.column_names is not None and self.text_column not in ds.column_names:
            raise CorpusError(f"covariance corpus {self.location} has no column {self.text_column!r} "
                              f"(columns: {', '.join(ds.column_names)}); set corpus.text_column")
        if self.reader == "saved":
            for batch in ds.select_columns([self.text_column]).iter(batch_size=BLOCK_TEXTS):
                yield from batch[self.text_column]
            return
        for row in ds:
            if self.text_column not in row:  # streamed JSON: the columns are known only row by row
                raise CorpusError(f"covariance corpus {self.location}: a row has no column {self.text_column!r} "
                                  f"(it has: {', '.join(row)}); set corpus.text_column")
            yield row[self.text_column]

    def texts(self) -> Iterator[str]:
        """The stripped, non-empty texts (lines of a text file, rows of a table)."""
        for value in self.rows():
            if value is None:
                continue
            if not isinstance(value, str):
                raise CorpusError(f"covariance corpus {self.location}: column {self.text_column!r} holds "
                                  f"{type(value).__name__} values, not text")
            text = value.strip()
            if text:
                yield text


@dataclass(frozen=True)
class Cut:
    """How the stream is cut: window length, and where it stops (0 = the whole corpus)."""

    max_length: int
    max_texts: int = 0
    max_tokens: int = 0


def adds_bos(tok) -> bool:
    ids = tok("a")["input_ids"]
    return tok.bos_token_id is not None and len(ids) > 0 and ids[0] == tok.bos_token_id


def _units(texts: Iterable[str], max_texts: int) -> Iterator[str]:
    """The texts with the separator attached to all but the last (one text of look-ahead)."""
    prev = None
    for i, text in enumerate(texts):
        if max_texts and i == max_texts:
            break
        if prev is not None:
            yield prev + SEPARATOR
        prev = text
    if prev is not None:
        yield prev


def text_blocks(corpus: Corpus, max_texts: int = 0) -> Iterator[list[str]]:
    """The texts (separator attached) in blocks of :data:`BLOCK_TEXTS`: the unit that is tokenised,
    shared among ranks, and checksummed."""
    block: list[str] = []
    for unit in _units(corpus.texts(), max_texts):
        block.append(unit)
        if len(block) == BLOCK_TEXTS:
            yield block
            block = []
    if block:
        yield block


def tokenise(tok, block: list[str]) -> list[int]:
    """A block's stream tokens: each text tokenised on its own (one batched call), concatenated."""
    return [i for ids in tok(block, add_special_tokens=False)["input_ids"] for i in ids]


def block_digest(tokens: list[int]) -> str:
    return hashlib.sha256(array("q", tokens).tobytes()).hexdigest()


def _text_width(tok, cut: Cut) -> tuple[list[int], int]:
    bos = [tok.bos_token_id] if adds_bos(tok) else []
    width = cut.max_length - len(bos)
    if width < 1:
        raise CorpusError(f"max_length {cut.max_length} leaves no room for text after the BOS token")
    return bos, width


def _cut(streams: Iterable[list[int]], bos: list[int], width: int, limit: int | None) -> Iterator[list[int]]:
    """Consecutive windows (``bos`` + ``width`` stream tokens; the last one shorter) of the
    concatenated ``streams``, stopping after ``limit`` stream tokens."""
    buf: list[int] = []
    taken = 0
    for ids in streams:
        if limit is not None:
            ids = ids[: limit - taken]
        buf.extend(ids)
        taken += len(ids)
        while len(buf) >= width:
            yield bos + buf[:width]
            del buf[:width]
        if limit is not None and taken >= limit:
            break
    if buf:
        yield bos + buf


def windows(corpus: Corpus, tok, cut: Cut) -> Iterator[list[int]]:
    """The token windows of the whole corpus (see the module docstring), streamed."""
    bos, width = _text_width(tok, cut)
    blocks = (tokenise(tok, b) for b in text_blocks(corpus, cut.max_texts))
    empty = True
    for w in _cut(blocks, bos, width, cut.max_tokens or None):
        empty = False
        yield w
    if empty:
        raise CorpusError(f"covariance corpus {corpus.location} has no text")


@dataclass(frozen=True)
class CutSummary:
    """What the counting pass finds: the numbers a cache key names, and per block of texts its
    stream tokens and their sha256 (so that a later pass knows where each block's tokens fall
    without tokenising it, and checks the ones it does tokenise)."""

    n_tokens: int  # in all windows, BOS included
    n_windows: int
    width: int  # the longest window (batches are padded to it)
    text_tokens: int  # stream tokens in the windows (BOS excluded)
    block_tokens: tuple[int, ...]  # stream tokens of each block (whole blocks; the cut may end inside the last)
    block_sha256: tuple[str, ...]
    joined_equal: bool  # a text file whose per-text tokenisation is that of its whole text


def joined_equal(corpus: Corpus, tok) -> bool:
    """Does tokenising each line on its own give the tokens of the whole text?  Checked on (up to
    :data:`JOINED_CHECK_CHARS` of) a plain text file; other sources were never read whole."""
    if not corpus.plain_text_file:
        return False
    lines, chars = [], 0
    for text in corpus.texts():
        lines.append(text)
        chars += len(text) + 1
        if chars >= JOINED_CHECK_CHARS:
            break
    whole = tok(SEPARATOR.join(lines), add_special_tokens=False)["input_ids"]
    return tokenise(tok, list(_units(lines, 0))) == whole


def tokenizer_sha256(tok) -> str | None:
    """A fingerprint of a fast tokenizer (its whole serialised definition); None for others."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(f"{backend.to_str()}\0{tok.bos_token_id}\0{adds_bos(tok)}".encode()).hexdigest()


def index_dir() -> Path | None:
    """Where counting passes are remembered (``$EDITLEDGER_CORPUS_INDEX``, ``off``, or the cache)."""
    from pipeline.models.loading import cache_home

    env = os.environ.get("EDITLEDGER_CORPUS_INDEX")
    if env == "off":
        return None
    return Path(env) if env else cache_home() / "corpus"


def count(corpus: Corpus, tok, cut: Cut) -> CutSummary:
    """The counting pass: every block tokenised once.  Under ``torchrun`` the ranks take turns
    (block ``k`` on rank ``k mod size``; every rank reads all texts, which is cheap next to
    tokenising them) and gather each round's counts and digests."""
    bos, width = _text_width(tok, cut)
    counts: list[int] = []
    digests: list[str] = []
    blocks = text_blocks(corpus, cut.max_texts)

    def measure(block: list[str]) -> tuple[int, str]:
        ids = tokenise(tok, block)
        return len(ids), block_digest(ids)

    while not (cut.max_tokens and sum(counts) >= cut.max_tokens):
        round_ = list(itertools.islice(blocks, distributed.size()))
        if not round_:
            break
        for n, digest in distributed.map_shared(measure, round_, "counting the corpus"):
            counts.append(n)
            digests.append(digest)
    text = min(sum(counts), cut.max_tokens) if cut.max_tokens else sum(counts)
    if not text:
        raise CorpusError(f"covariance corpus {corpus.location} has no text")
    n_windows = -(-text // width)
    return CutSummary(text + n_windows * len(bos), n_windows, min(width, text) + len(bos), text, tuple(counts),
                      tuple(digests), joined_equal(corpus, tok))


def shard_batches(corpus: Corpus, tok, cut: Cut, summary: CutSummary, per_batch: int
                  ) -> tuple[Iterator[list[list[int]]], int]:
    """This rank's batches (and how many): a contiguous share of the batches of ``per_batch``
    consecutive windows that one process forms, the first ranks taking one more where they do not
    divide.  Only the blocks holding them are tokenised (each checked against its digest); the
    others are read and skipped.  One process: every batch, every block."""
    bos, width = _text_width(tok, cut)
    n_batches = -(-summary.n_windows // per_batch)
    q, extra = divmod(n_batches, distributed.size())
    r = distributed.rank()
    lo = r * q + min(r, extra)
    hi = lo + q + (r < extra)
    first, last = lo * per_batch, min(hi * per_batch, summary.n_windows)  # windows
    start, stop = first * width, min(last * width, summary.text_tokens)  # stream tokens

    def stream() -> Iterator[list[int]]:
        at = 0  # stream position of the block's first token
        for k, block in enumerate(text_blocks(corpus, cut.max_texts)):
            if at >= stop or k == len(summary.block_tokens):
                break
            n = summary.block_tokens[k]
            if at + n > start:
                ids = tokenise(tok, block)
                if len(ids) != n or block_digest(ids) != summary.block_sha256[k]:
                    raise CorpusError(f"covariance corpus {corpus.location} changed since it was counted (block {k} "
                                      "of its texts differs; or its entry in the corpus index is stale): nothing was "
                                      "written; run again")
                yield ids[max(0, start - at) : stop - at]
            at += n

    def counted() -> Iterator[list[int]]:
        made = 0
        for w in _cut(stream(), bos, width, stop - start):
            made += 1
            yield w
        if made != last - first:
            raise CorpusError(f"covariance corpus {corpus.location} has fewer tokens than when it was counted: "
                              "nothing was written; run again")

    return chunked(counted(), per_batch), hi - lo


def chunked(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Consecutive groups of ``n`` (the last one shorter)."""
    it = iter(items)
    while group := list(itertools.islice(it, n)):
        yield group


def summarise(corpus: Corpus, tok, cut: Cut, where: Path | None = None) -> CutSummary:
    """:func:`count`, read from the index when this corpus, tokenizer and cut were counted before
    (rank 0 reads and writes the index and tells the others)."""
    where = where if where is not None else index_dir()
    tok_fp = tokenizer_sha256(tok)
    if where is None or tok_fp is None:
        return count(corpus, tok, cut)
    key = {"format": INDEX_FORMAT, "corpus_sha256": corpus.sha256, "source": corpus.describe(), "tokenizer": tok_fp,
           "cut": asdict(cut), "block_texts": BLOCK_TEXTS}
    path = Path(where) / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()}.json"
    known = distributed.broadcast(_read_index(path, key) if distributed.is_main() else None, "reading the corpus index")
    if known is not None:
        return known
    summary = count(corpus, tok, cut)
    if distributed.is_main():
        _write_atomic(path, json.dumps({"key": key, "summary": asdict(summary)}, sort_keys=True))
    return summary


def _read_index(path: Path, key: dict) -> CutSummary | None:
    try:
        doc = json.loads(path.read_text())
        if doc["key"] == key:
            s = doc["summary"]
            return CutSummary(**{**s, "block_tokens": tuple(s["block_tokens"]), "block_sha256": tuple(s["block_sha256"])})
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: counted again and rewritten
    return None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def key_fields(corpus: Corpus, cut: Cut, summary: CutSummary) -> dict[str, Any]:
    """What a covariance cache key names about the corpus beyond the fields it always had (corpus
    sha256, tokens, windows, window length): nothing for a plain text file read as before; else the
    reader, the stop at ``max_tokens``, and that texts were tokenised one by one."""
    out: dict[str, Any] = {}
    if not corpus.plain_text_file:
        out["corpus_source"] = corpus.describe()
    if cut.max_tokens:
        out["max_tokens"] = cut.max_tokens
    if not summary.joined_equal:
        out["tokenization"] = "each text on its own, '\\n' attached"
    return out
