"""The attention kernel a heavy loop runs with, switched for the loop and restored after.

Value optimisation runs many short suffixes (2–10 tokens after the subject's last token, over a
cached prefix) forward *and backward*.  On CPU, PyTorch's fused SDPA ("flash") kernel spent
36% of a PMET step on SmolLM2-135M in the backward of these tiny attention blocks (15 ms per
call); the plain matmul + softmax ("eager") formulation does the same work in a few batched
``bmm`` calls, and the whole step became 1.8× faster (``benchmarks/RESULTS.md``, issue 6).  Which
kernel runs changes the float rounding, so it is a recorded hyper-parameter (``v_attention``),
not a silent default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

ATTENTION_CHOICES = ("model", "eager", "sdpa")  # "model": whatever the model was loaded with


@contextmanager
def attention_implementation(model, name: str) -> Iterator[None]:
    """Run the body with ``model``'s attention set to ``name``; the model's own choice comes back after.

    Models whose attention cannot be switched at run time (those not built on transformers'
    attention interface) keep their own kernel: the result is still deterministic, only not faster.
    """
    before = model.config._attn_implementation
    switch = name != "model" and name != before and model._can_set_attn_implementation()
    if switch:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)
