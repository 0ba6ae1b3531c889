"""Where a project's files are: the repository root (found from the working directory), its ledger,
data and ``params.yaml``.

A module of its own, with nothing heavy imported, because every command starts by finding the
project, and reading commands (``editledger log``) must not pay for the model code.  Root stages
run with the repository root as working directory; batch stages run inside their batch directory
``ledger/<seq>-<hash12>/``, so the root is two levels up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import load_params


@dataclass(frozen=True)
class Project:
    root: Path

    @classmethod
    def find(cls, start: str | Path | None = None) -> Project:
        """``$EDITLEDGER_ROOT``, else the nearest directory (from ``start`` or the cwd up) holding
        ``.dvc/`` (batch directories hold a dvc.yaml too, so that is not the marker), else the cwd."""
        if os.environ.get("EDITLEDGER_ROOT"):
            return cls(Path(os.environ["EDITLEDGER_ROOT"]).resolve())
        here = Path(start or Path.cwd()).resolve()
        for p in (here, *here.parents):
            if (p / ".dvc").is_dir():
                return cls(p)
        return cls(here)

    @classmethod
    def of_batch(cls, batch_dir: str | Path) -> Project:
        return cls(Path(batch_dir).resolve().parent.parent)

    ledger = property(lambda self: self.root / "ledger")
    data = property(lambda self: self.root / "data")
    model_dir = property(lambda self: self.root / "data" / "model")
    model_json = property(lambda self: self.root / "data" / "model.json")
    covariance_dir = property(lambda self: self.root / "data" / "covariance")
    params_file = property(lambda self: self.root / "params.yaml")

    def path(self, value: str | Path) -> Path:
        """A path from params.yaml: absolute, or relative to the project root."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.root / p

    def params(self, path: str | Path | None = None) -> dict[str, Any]:
        """params.yaml (or ``path``), with defaults filled in."""
        if path is not None:
            return load_params(path)
        return load_params(self.params_file if self.params_file.exists() else None)
