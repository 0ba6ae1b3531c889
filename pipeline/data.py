"""The shared datasets: verified against their SHA-256 sums before anything reads them.

``../shared/data`` is a read-only mirror (see its README); nothing is read from it without
checking the sum listed in its ``SHA256SUMS``.  ``$EDITLEDGER_SHARED_DATA`` points elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATASETS = {
    "counterfact": "counterfact/multi_counterfact_dev.json",
    "zsre": "zsre/zsre_dev.json",
    "me_ppl_50": "me_ppl/ME-PPL_50.json",
    "me_ppl_1k": "me_ppl/ME-PPL_1k.json",
    "wikitext": "wikitext/wikitext2_raw_test.txt",
}


class DataError(RuntimeError):
    """A shared data file is missing or does not match its recorded SHA-256."""


def shared_dir() -> Path:
    return Path(os.environ.get("EDITLEDGER_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


def expected_sums(root: Path | None = None) -> dict[str, str]:
    root = root or shared_dir()
    sums = root / "SHA256SUMS"
    if not sums.exists():
        raise DataError(f"no SHA256SUMS in {root}: is the shared data mirror in place?")
    out = {}
    for line in sums.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.strip()] = digest
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified_path(name: str, root: Path | None = None) -> Path:
    """Path of dataset ``name`` after checking its SHA-256 against SHA256SUMS."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    root = root or shared_dir()
    rel = DATASETS[name]
    path = root / rel
    if not path.exists():
        raise DataError(f"dataset file {path} is missing")
    want = expected_sums(root).get(rel)
    if want is None:
        raise DataError(f"{rel} is not listed in {root / 'SHA256SUMS'}")
    got = sha256_file(path)
    if got != want:
        raise DataError(f"{path} fails its SHA-256 check (expected {want[:16]}…, got {got[:16]}…)")
    return path


def me_ppl_texts(root: Path | None = None) -> list[str]:
    """The ME-PPL-50 texts of the shared mirror (verified), for scripts outside a project; the
    pipeline's stages read the data stage's copy instead (``stages.common.me_ppl_texts``)."""
    return [r["Text"] for r in json.loads(verified_path("me_ppl_50", root).read_text(encoding="utf-8"))]


def sample_records(name: str, start: int, n: int, root: Path | None = None) -> list[dict]:
    """Records ``start .. start+n`` of a JSON dataset, in file order (deterministic)."""
    if start < 0 or n < 1:
        raise DataError(f"need start ≥ 0 and n ≥ 1, got start={start}, n={n}")
    records = json.loads(verified_path(name, root).read_text(encoding="utf-8"))
    if start + n > len(records):
        raise DataError(f"{name} has {len(records)} records; cannot take {n} from {start}")
    return records[start : start + n]
