"""editledger: lifelong, auditable knowledge editing of language models.

The names below are imported on first use (PEP 562), not with the package: every DVC stage and
``editledger`` command imports ``pipeline``, and loading the editing engine with it cost each of
them seconds (transformers' model code) that most of them never use.
"""

from importlib import import_module

_WHERE = {"EditResult": "pipeline.editing.engine", "edit": "pipeline.editing.engine",
          "HParams": "pipeline.editing.hparams", "load_hparams": "pipeline.editing.hparams",
          "apply_deltas": "pipeline.models.weights", "EditRequest": "pipeline.requests",
          "load_requests": "pipeline.requests", "parse_requests": "pipeline.requests"}

__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
