"""Run independent pieces of CPU work in forked, single-threaded processes.

Value optimisation is a long series of small matmuls (a few hundred rows of width 576–1536): on a
CPU they scale poorly over threads, while requests are independent and scale almost linearly over
processes.  So a batch can be cut into slices, each optimised by its own single-threaded process.

Why fork, and why one thread each: a forked child shares the parent's model pages (no copy, no
reload), and needs no pickling of the model.  But the GNU OpenMP runtime that PyTorch's CPU
wheels use does not survive ``fork()`` once the parent has run a parallel region: a child that
asks for more than one thread hangs (measured with torch 2.13).  A single-threaded child never
enters the thread pool, so it is safe.  The parent works on the first slice itself, also with one
thread, and gets its thread setting back afterwards.

Results travel back through a pipe as ``torch.save`` bytes; an exception raised in a child is
re-raised in the parent (same type where it can be pickled), after every child has ended.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import traceback
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch


class WorkerError(RuntimeError):
    """A worker process failed in a way that could not be sent back as its own exception."""


def available_workers(requested: int) -> int:
    """How many processes ``requested`` means: 0 = one per thread torch would use here."""
    return torch.get_num_threads() if requested == 0 else requested


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _encode(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _decode(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _child(fn: Callable[[Any], Any], item: Any, conn) -> None:
    """Body of a forked worker: one thread, run ``fn(item)``, send ("ok", result) or ("error", …)."""
    torch.set_num_threads(1)
    try:
        message = ("ok", _encode(fn(item)))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        text = "".join(traceback.format_exception(exc))
        try:
            message = ("error", pickle.dumps(exc), text)
        except Exception:  # noqa: BLE001 - an exception that cannot be pickled
            message = ("error", None, text)
    try:
        conn.send_bytes(pickle.dumps(message))
    finally:
        conn.close()
        os._exit(0)  # skip the parent's atexit handlers and buffered output, copied by fork


def _exception(data: bytes | None, text: str) -> BaseException:
    try:
        return pickle.loads(data) if data is not None else WorkerError(text)
    except Exception:  # noqa: BLE001 - an exception class whose arguments do not round-trip
        return WorkerError(text)


def fork_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(x) for x in items]`` with ``items[1:]`` in forked single-threaded children.

    CPU only: a CUDA context cannot be used after ``fork()``.  With one item it runs in-process.
    """
    if len(items) <= 1:
        return [fn(x) for x in items]
    ctx = multiprocessing.get_context("fork")
    children = []
    try:
        for item in items[1:]:
            recv, send = ctx.Pipe(duplex=False)
            with warnings.catch_warnings():  # Python ≥ 3.12 warns on fork with threads: see the module doc
                warnings.simplefilter("ignore", DeprecationWarning)
                proc = ctx.Process(target=_child, args=(fn, item, send), daemon=True)
                proc.start()
            send.close()
            children.append((proc, recv))
        with _threads(1):
            try:
                results = [fn(items[0])]
            except BaseException:
                for proc, _ in children:  # no point in waiting for the other slices
                    proc.kill()
                raise
        first_error: BaseException | None = None
        for proc, recv in children:
            try:
                message = pickle.loads(recv.recv_bytes())
            except EOFError:
                proc.join()
                message = ("error", None, f"worker process {proc.pid} died (exit code {proc.exitcode})")
            if message[0] == "ok":
                results.append(_decode(message[1]))
            elif first_error is None:
                first_error = _exception(message[1], message[2])
                first_error.add_note(f"raised in a value worker process:\n{message[2]}")
        if first_error is not None:
            raise first_error
        return results
    finally:
        for proc, recv in children:
            recv.close()
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
                proc.join()
