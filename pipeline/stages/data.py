"""Stage ``data``: verify the shared datasets against SHA256SUMS and convert them to Parquet.

Outputs: ``data/counterfact.parquet``, ``data/zsre.parquet``, ``data/me_ppl_50.parquet`` (one row
per record: readable fields plus the full record as JSON) and a verified copy of the WikiText
sample, the default covariance corpus.  Request records that the editor would reject (e.g. a zsRE
record whose new answer equals the old one) are kept, with the reason in ``error``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.data import DATASETS, DataError, expected_sums, verified_path
from pipeline.requests import RequestError, parse_record
from pipeline.ledger import atomic
from pipeline.stages.common import CORPUS, Project

TABLES = {"counterfact": "counterfact.parquet", "zsre": "zsre.parquet", "me_ppl_50": "me_ppl_50.parquet"}
REQUEST_DATASETS = ("counterfact", "zsre")


def records_frame(name: str, records: list[dict]) -> pd.DataFrame:
    rows = []
    for i, rec in enumerate(records):
        row: dict = {"index": i}
        if name in REQUEST_DATASETS:
            try:
                r = parse_record(rec, i)
                row.update(subject=r.subject, prompt=r.prompt, target_new=r.target_new, target_true=r.target_true,
                           relation_id=r.relation_id, case_id=json.dumps(r.case_id), error=None)
            except RequestError as exc:
                row.update(subject=None, prompt=None, target_new=None, target_true=None, relation_id=None,
                           case_id=json.dumps(rec.get("case_id")), error=str(exc))
        else:
            row.update({k: v for k, v in rec.items() if isinstance(v, str)})
        row["record"] = json.dumps(rec, ensure_ascii=False, sort_keys=True)
        rows.append(row)
    return pd.DataFrame(rows)


def run(project: Project, shared: Path) -> dict:
    shared = project.path(shared)
    project.data.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, out in TABLES.items():
        records = json.loads(verified_path(name, shared).read_text(encoding="utf-8"))
        atomic.write_parquet(project.data / out, records_frame(name, records))
        counts[name] = len(records)
    src = verified_path("wikitext", shared)
    dest = project.root / CORPUS
    dest.parent.mkdir(parents=True, exist_ok=True)
    if atomic.write_bytes(dest, src.read_bytes()) != expected_sums(shared)[DATASETS["wikitext"]]:
        raise DataError(f"{src} changed while it was copied; run the stage again")
    return counts
