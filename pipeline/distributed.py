"""Sharding work over local processes with ``torch.distributed``, as launched by ``torchrun``.

The two embarrassingly parallel parts of the pipeline — the key covariance over a corpus and the
evaluation of many prompts — split their work over the processes ``torchrun`` starts (gloo on
CPU, NCCL on GPU): every rank runs the same code on the same inputs, takes its share of the
*batches* the single process would form, and the results are combined in a fixed order.  The
evaluation deals its batches round robin (:func:`map_shared`: batch ``i`` on rank ``i mod size``)
and gathers them in order; the covariance gives each rank a contiguous run of batches (so that it
tokenises only its part of the corpus, :func:`pipeline.corpus.shard_batches`) and sums.  Batches
are the unit because a batch's numbers are the same bits on any rank, so a sharded evaluation
gives exactly the single process's metrics and a sharded covariance differs from it only by the
order of its float64 additions.

Outside ``torchrun`` (or with one process) every function here is the single-process identity:
library callers need not know about it.  Inside, the code paths that call these functions must be
reached by every rank in the same order (they are collectives); only rank 0 writes files.

A rank that dies makes the collective the others are in fail (or ``torchrun`` stops them); the
error names the step, and nothing is written because rank 0 writes only after the last
collective.  :func:`fault_point` lets the tests kill a chosen rank at a chosen step.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")

CRASH_ENV = "EDITLEDGER_CRASH_AT"  # <point>: the rank(s) picked by CRASH_RANK_ENV SIGKILL themselves there
CRASH_RANK_ENV = "EDITLEDGER_CRASH_RANK"  # which rank crashes (default: every rank)


class DistributedError(RuntimeError):
    """A collective failed: another rank stopped (killed, out of memory, an error) before it finished."""


def launched() -> bool:
    """Started by ``torchrun`` with more than one process?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> str:
    """Join the process group ``torchrun`` set up (idempotent; nothing in a single process) and
    return the device this rank computes on: under ``torchrun`` a ``cuda`` device becomes
    ``cuda:<LOCAL_RANK>``, one GPU per process."""
    if not launched():
        return device
    cuda = device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(dist.destroy_process_group)
        # torchrun stops the other ranks with SIGTERM when one fails: unwind (temporary files are
        # removed by their ``finally``) and say why, instead of vanishing mid-write
        signal.signal(signal.SIGTERM, _stopped)
    return f"cuda:{local}" if cuda else device


def _stopped(signum, frame) -> None:
    raise DistributedError(f"rank {rank()} of {size()}: stopped by torchrun because another rank failed; "
                           "nothing was written")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the one process that reads caches and writes files."""
    return rank() == 0


def mine(items: Iterable[T]) -> Iterator[T]:
    """This rank's share of ``items``: the ``i``-th goes to rank ``i mod size``.  Every rank walks
    the whole iterable (for a stream of token windows: tokenises all of it), so that the shares
    need no count up front."""
    r, n = rank(), size()
    return (x for i, x in enumerate(items) if i % n == r)


def _collective(what: str, fn: Callable[[], R]) -> R:
    try:
        return fn()
    except RuntimeError as exc:  # gloo/NCCL: a peer closed its connection, or a timeout
        raise DistributedError(f"rank {rank()} of {size()}: {what} failed because another rank stopped "
                               f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                               "nothing was written") from exc


def map_shared(fn: Callable[[T], R], items: Sequence[T], what: str = "gathering results") -> list[R]:
    """``[fn(x) for x in items]``, each item computed on one rank (:func:`mine`) and the results
    gathered, in item order, on every rank.  Results must be picklable (CPU tensors, lists)."""
    if size() == 1:
        return [fn(x) for x in items]
    done = {i: fn(items[i]) for i in mine(range(len(items)))}
    parts: list[dict[int, R] | None] = [None] * size()
    _collective(what, lambda: dist.all_gather_object(parts, done))
    merged = {i: v for part in parts for i, v in part.items()}
    return [merged[i] for i in range(len(items))]


def sum_tensors(tensors: list[torch.Tensor], what: str) -> None:
    """Sum each tensor over the ranks, in place (a no-op in a single process)."""
    if size() == 1:
        return
    for t in tensors:
        _collective(what, lambda t=t: dist.all_reduce(t, op=dist.ReduceOp.SUM))


def broadcast(obj: T, what: str) -> T:
    """Rank 0's ``obj`` on every rank (others pass anything, e.g. None)."""
    if size() == 1:
        return obj
    box = [obj]
    _collective(what, lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def fault_point(name: str) -> None:
    """``SIGKILL`` this process here if ``$EDITLEDGER_CRASH_AT`` is ``name`` and
    ``$EDITLEDGER_CRASH_RANK`` is unset or this rank: a rank dying mid-run, for the tests."""
    if os.environ.get(CRASH_ENV) == name and os.environ.get(CRASH_RANK_ENV, str(rank())) == str(rank()):
        os.kill(os.getpid(), signal.SIGKILL)


def launch(processes: int, args: Sequence[str]) -> int:
    """Run ``python -m pipeline ARGS`` in ``processes`` local processes under ``torchrun``
    (``--standalone``: a free port on this machine) and return its exit code; their output goes
    to this process's.  What a DVC stage does when ``params.yaml`` asks for more than one process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
           "-m", "pipeline", *args]
    return subprocess.call(cmd)
