"""The pipeline's stage file of a ledger batch (``ledger/<seq>-<hash12>/dvc.yaml``).

The ledger stores it with the batch's other inputs; what the stages are, and which of them reads
what, is the pipeline's business (this module), not the ledger's.  Written once, at add time: a
batch's stage file is never rewritten, so changing it here changes only batches added later.
"""

from __future__ import annotations

import yaml

from pipeline.editing.driver import interleaves
from pipeline.editing.hparams import HParams
from pipeline.editing.methods import get_method
from pipeline.ledger.batch import Batch
from pipeline.ledger.layout import (BATCH_FILE, DELTAS_FILE, ENTRY_FILE, EVAL_FILE, INDEX_FILE, KEYS_FILE, KV_FILE,
                                    METRICS_FILE, REQUESTS_FILE, SNAPSHOT_FILE, STATE_FILE, TRACE_FILE)

# data the evaluate stage reads (outputs of the root data stage): ME-PPL-50, and the WikiText sample
# on which the consistency metric's IDF is fitted
EVAL_DATA = ("../../data/me_ppl_50.parquet", "../../data/wikitext/wikitext2_raw_test.txt")
COVARIANCE_DIR = "../../data/covariance"


def batch_stages(batch: Batch) -> dict:
    """The stages of one batch.  Paths are relative to the batch directory (DVC's working dir).

    Each batch depends only on its parent's ``state.json`` (which pins the parent's entry id and
    weights, hence the whole history before it), so a change anywhere reruns exactly the batches
    from there on.  The base model enters through ``data/model.json`` (its fingerprint).
    """
    parent_state = f"../{batch.parent}/{STATE_FILE}" if batch.parent else None
    model = "../../data/model.json"
    upstream = [parent_state] if parent_state else []
    if batch.kind == "checkpoint":  # no dependency on the batches it seals: DVC no longer sees them
        return {"stages": {"apply": {"cmd": "editledger stage apply --batch .", "deps": [BATCH_FILE, model],
                                     "outs": [ENTRY_FILE, SNAPSHOT_FILE, INDEX_FILE, STATE_FILE]}}}
    if batch.kind != "edit":
        deps = [*upstream, BATCH_FILE] + ([] if batch.kind == "revert" else [model])
        return {"stages": {"apply": {"cmd": "editledger stage apply --batch .", "deps": deps,
                                     "outs": [ENTRY_FILE, STATE_FILE]}}}
    # iterative editing and separate optimisation run spreads inside keys_values: it reads the covariances
    kv_deps = [*upstream, model, BATCH_FILE, REQUESTS_FILE] + ([COVARIANCE_DIR] if _interleaved(batch) else [])
    return {"stages": {
        "keys_values": {"cmd": "editledger stage keys-values --batch .", "deps": kv_deps, "outs": [KV_FILE, TRACE_FILE]},
        "apply": {"cmd": "editledger stage apply --batch .",
                  "deps": [*upstream, model, BATCH_FILE, REQUESTS_FILE, KV_FILE, COVARIANCE_DIR,
                           "../../data/me_ppl_50.parquet"],  # the collapse guard's texts
                  "params": [{"../../params.yaml": ["guard"]}],  # its threshold decides what is applied
                  "outs": [ENTRY_FILE, KEYS_FILE, DELTAS_FILE, STATE_FILE]},
        # the evaluation also reads the earlier active batches' requests (retention), pinned by
        # state.json through the chain of entry ids, and its settings in the root params.yaml
        "evaluate": {"cmd": "editledger stage evaluate --batch .",
                     # neighbour-assisted batches: evaluate reads which neighbours were used for editing
                     "deps": [STATE_FILE, model, REQUESTS_FILE, *EVAL_DATA]
                             + ([KV_FILE] if (batch.hparams or {}).get("neighbors") else []),
                     "params": [{"../../params.yaml": ["evaluation"]}], "outs": [EVAL_FILE],
                     "metrics": [{METRICS_FILE: {"cache": False}}]},
    }}


def _interleaved(batch: Batch) -> bool:
    """Does the batch's keys_values stage also spread (iterative editing, separate optimisation)?"""
    return interleaves(get_method(batch.method), HParams.from_dict(batch.hparams))


def batch_dvc_yaml(batch: Batch) -> str:
    """The stage file's text (a :data:`~pipeline.ledger.batch.StageFile`)."""
    return ("# Written by `editledger` for this batch; `dvc repro -P` runs it (see docs/LEDGER.md).\n"
            + yaml.safe_dump(batch_stages(batch), sort_keys=False, default_flow_style=False))
