"""editledger: lifelong, auditable knowledge editing of language models."""

from pipeline.editing.engine import EditResult, edit
from pipeline.editing.hparams import HParams, load_hparams
from pipeline.models.weights import apply_deltas
from pipeline.requests import EditRequest, load_requests, parse_requests

__all__ = ["EditRequest", "EditResult", "HParams", "apply_deltas", "edit", "load_hparams", "load_requests", "parse_requests"]
__version__ = "0.1.0"
