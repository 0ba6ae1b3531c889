"""editledger: lifelong, auditable knowledge editing of language models.

The public names are imported on first use (PEP 562): ``import pipeline.cli`` must not pay for
torch and transformers before a command knows it needs them (``editledger log`` does not).
"""

from importlib import import_module

_EXPORTS = {"EditResult": "pipeline.editing.engine", "edit": "pipeline.editing.engine",
            "HParams": "pipeline.editing.hparams", "load_hparams": "pipeline.editing.hparams",
            "apply_deltas": "pipeline.models.weights", "EditRequest": "pipeline.requests",
            "load_requests": "pipeline.requests", "parse_requests": "pipeline.requests"}

__all__ = ["EditRequest", "EditResult", "HParams", "apply_deltas", "edit", "load_hparams", "load_requests", "parse_requests"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
