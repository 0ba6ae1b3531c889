"""Forward hooks: read a module's input/output, rewrite its input or output, stop the forward early
or skip blocks.

All editing code reads and writes hidden states through these few functions so that every
architecture goes through the same, tested path (blocks that return tuples and blocks that return
tensors alike).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the needed layer has run."""


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _with_first(output, tensor):
    return (tensor, *output[1:]) if isinstance(output, tuple) else tensor


@contextmanager
def hooks(registrations: list[Callable[[], torch.utils.hooks.RemovableHandle]]) -> Iterator[None]:
    """Register hooks for the duration of a ``with`` block; always removed, even on error."""
    with ExitStack() as stack:
        for register in registrations:
            stack.callback(register().remove)
        yield


def record_input(module: nn.Module, store: dict, key) -> Callable:
    """Hook factory: ``store[key]`` = the module's first positional input (e.g. the MLP key)."""

    def register():
        return module.register_forward_pre_hook(lambda _m, args: store.__setitem__(key, args[0]))

    return register


def record_output(module: nn.Module, store: dict, key, raw: bool = False) -> Callable:
    """Hook factory: ``store[key]`` = the module's output tensor (first element of a tuple), or
    the output exactly as returned with ``raw``."""

    def register():
        return module.register_forward_hook(lambda _m, _a, out: store.__setitem__(key, out if raw else _first(out)))

    return register


def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """Hook factory: replace the module's output tensor ``t`` by ``fn(t)``."""

    def register():
        return module.register_forward_hook(lambda _m, _a, out: _with_first(out, fn(_first(out))))

    return register


def stop_after(module: nn.Module) -> Callable:
    """Hook factory: abort the forward right after ``module`` (no wasted upper layers)."""

    def _raise(_m, _a, _o):
        raise StopForward

    def register():
        return module.register_forward_hook(_raise)

    return register


def run_truncated(forward: Callable[[], object]) -> None:
    """Run a forward that a :func:`stop_after` hook may cut short."""
    try:
        forward()
    except StopForward:
        pass


def replace_input(module: nn.Module, tensor: torch.Tensor) -> Callable:
    """Hook factory: the module receives ``tensor`` as its first positional input (every
    supported family passes the hidden state to its blocks positionally)."""

    def register():
        return module.register_forward_pre_hook(lambda _m, args: (tensor, *args[1:]))

    return register


@contextmanager
def bypass(modules: list[nn.Module], output_like) -> Iterator[None]:
    """Within the block, each module returns its first input unchanged, shaped like ``output_like``
    (a real output of such a module: a tensor, or a tuple whose first element is the hidden
    state).  For blocks whose result is replaced downstream anyway (:func:`replace_input`):
    running them would be wasted work."""

    def passthrough(hidden, *_args, **_kwargs):
        return _with_first(output_like, hidden)

    try:
        for m in modules:
            m.forward = passthrough
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)


@contextmanager
def start_at(entry: nn.Module, below: list[nn.Module], hidden: torch.Tensor | None, output_like) -> Iterator[None]:
    """Within the block the forward starts at block ``entry`` from ``hidden`` (kept from an earlier
    forward): ``entry`` receives it as its input and the blocks ``below`` it are pass-throughs
    shaped like ``output_like``.  With no blocks below, nothing changes.  Hooks registered inside
    the block on ``entry`` see ``hidden``: this hook is registered first."""
    if not below:
        yield
        return
    with hooks([replace_input(entry, hidden)]), bypass(below, output_like):
        yield


def add_at(rows: torch.Tensor, cols: torch.Tensor, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """An output rewrite adding ``delta[i]`` at position ``(rows[i], cols[i])`` (autograd-safe)."""

    def fn(t: torch.Tensor) -> torch.Tensor:
        return t.index_put((rows, cols), delta.to(t.dtype), accumulate=True)

    return fn
