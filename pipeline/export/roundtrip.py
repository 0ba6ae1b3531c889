"""Reading an export back the way its users will, and comparing its logits with the state's.

An export is only useful if its ecosystem computes the same model from it.  Before an export is
moved into place it is read back — the adapter with ``PeftModel.from_pretrained`` on the base
model, the GGUF file with transformers' GGUF loader (the reader llama.cpp users have in Python) —
and its logits on a fixed text are compared with the edited model's.  This catches what no
tensor-level check can: a hyper-parameter the GGUF metadata does not carry (transformers and
llama.cpp would then run another model), a transposed or mis-permuted matrix, a wrong LoRA scale.

The reference for a float16 GGUF is the edited model with exactly the tensors the file stores in
float16 rounded to float16: the check is then as strict as for float32 (it tests the file, not
float16), and what float16 itself costs is reported separately.
"""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from pipeline.export.files import ExportError
from pipeline.export.gguf_layout import GgufTensor

PROBE = ("The mother tongue of Danielle Darrieux is French. The capital of Italy is Rome, and Toko Yasuda plays "
         "the guitar.")
RTOL = 1e-4  # tolerated max |Δ logit| relative to max |logit| (at least 1): float32 summation order, not a model change


@dataclass(frozen=True)
class RoundTrip:
    reader: str
    max_abs_diff: float  # max |logit read back − logit of the state| on the probe text
    tolerance: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def probe_ids(tokenizer) -> torch.Tensor:
    return tokenizer(PROBE, return_tensors="pt").input_ids


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids.to(next(model.parameters()).device)).logits.double().cpu()


def compare(reader: str, expected: torch.Tensor, got: torch.Tensor) -> RoundTrip:
    """The round trip's numbers; :class:`ExportError` if the reader computes another model."""
    diff = float((expected - got).abs().max())
    tol = RTOL * max(1.0, float(expected.abs().max()))
    if not diff <= tol:  # also NaN
        raise ExportError(f"read back with {reader}, the export gives other logits than the state (max |Δ| {diff:.3g} > "
                          f"{tol:.3g}); nothing was written")
    return RoundTrip(reader, diff, tol, int(expected.shape[1]))


def read_peft(base_model: nn.Module, adapter_dir: Path) -> nn.Module:
    """The adapter on a copy of the base model, as a PEFT user loads it."""
    from peft import PeftModel

    with warnings.catch_warnings():  # PEFT 0.21 calls an API transformers 5 deprecates; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir)).eval()


@contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """transformers' GGUF loader draws progress bars and logs reports; keep the CLI's output to its own lines."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    buf = io.StringIO()
    try:
        with redirect_stdout(buf), redirect_stderr(buf):
            yield buf
    finally:
        hf_logging.set_verbosity(level)


def read_gguf(path: Path) -> nn.Module:
    """The GGUF file as transformers loads it (``from_pretrained(dir, gguf_file=...)``, float32)."""
    from transformers import AutoModelForCausalLM

    with _quiet():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=str(path.resolve()), dtype=torch.float32, ignore_mismatched_sizes=True,
                output_loading_info=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the export's failure
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"transformers cannot read the GGUF export back ({first}); nothing was written") from None
    wrong = [*(f"{key} has shape {tuple(built)} in the model transformers builds from the metadata, {tuple(stored)} "
               "in the file" for key, stored, built in sorted(info["mismatched_keys"])),
             *(f"{key} is missing from the file" for key in sorted(info["missing_keys"]))]
    if wrong:
        raise ExportError(f"transformers reads the GGUF export back as another model: {wrong[0]} ({len(wrong)} "
                          "difference(s); the GGUF metadata does not carry every setting of this model's config); "
                          "nothing was written")
    return model.eval()


@torch.no_grad()
def rounded_as_stored(model: nn.Module, plan: Iterable[GgufTensor]) -> nn.Module:
    """A copy of ``model`` whose parameters are rounded exactly as the GGUF file stores them."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    for t in plan:
        if t.data.dtype == np.float16:
            p = params[t.source]
            p.copy_(p.half().to(p.dtype))
    return out
