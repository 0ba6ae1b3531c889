"""Working copies of a model in the compute dtype of a heavy loop.

Value optimisation and the covariance pass only *read* the weights, so they may run on a copy
in a cheaper dtype (``HParams.v_dtype`` / ``cov_dtype``); the model the edit is written into is
never cast.  Tensors the optimiser updates (``δ``) stay at least float32 whatever the compute
dtype: Adam's small steps vanish in bfloat16.
"""

from __future__ import annotations

import copy
import warnings

import torch


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def working_copy(model, dtype: str):
    """``model`` itself if it already computes in ``dtype``, else a detached copy cast to it."""
    target = torch_dtype(dtype)
    if next(model.parameters()).dtype == target:
        return model
    if target == torch.bfloat16 and next(model.parameters()).device.type == "cpu" and not native_bfloat16():
        warnings.warn("bfloat16 compute on a CPU without bfloat16 dot products (no AVX512-BF16/AMX): matmuls are "
                      "emulated, about 30x slower than float32; set v_dtype/cov_dtype to float32 on this machine",
                      RuntimeWarning, stacklevel=2)
    work = copy.deepcopy(model).to(target)
    work.eval()
    work.requires_grad_(False)
    return work


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype optimised tensors are kept in: float32 or wider."""
    return torch.promote_types(dtype, torch.float32)


def native_bfloat16() -> bool:
    """Does this CPU multiply bfloat16 natively (AVX512-BF16 or AMX)?  Without, torch emulates it:
    measured 1.0 vs 32 GFLOP/s float32 on one AMD Zen 3 core."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
