"""Value optimisation in forked single-threaded workers: same results, errors come back, no leftovers."""

from __future__ import annotations

import multiprocessing
import os

import pytest
import torch

import pipeline.editing.targets as targets_mod
from pipeline.editing.targets import concat_values, even_slices, value_workers
from pipeline.editing.hparams import HParams, HParamsError
from pipeline.editing.optimise import OptimisationError, ValueResult
from pipeline.editing.workers import WorkerError, fork_map
import pipeline
import pipeline.editing.optimise as optimise_mod
from conftest import poison_losses
from test_engine_tiny import HP, _edit, _records


def _whoami(x):
    return x, os.getpid(), torch.get_num_threads()


def test_fork_map_keeps_order_and_runs_slices_in_single_threaded_children():
    threads = torch.get_num_threads()
    out = fork_map(_whoami, [10, 11, 12])
    assert [x for x, _, _ in out] == [10, 11, 12]
    pids = [pid for _, pid, _ in out]
    assert pids[0] == os.getpid() and len(set(pids)) == 3  # the first slice in-process, the others forked
    assert all(n == 1 for _, _, n in out)
    assert torch.get_num_threads() == threads  # the parent's setting is back
    assert fork_map(_whoami, [7]) == [(7, os.getpid(), threads)]  # one slice: no fork, no thread change


def _fail_in_child(x):
    if x == 2:
        raise OptimisationError(3, [5])
    return x


class _Unpicklable(Exception):
    def __init__(self, a, b):  # pickling re-calls __init__ with args=(message,): fails to load
        super().__init__(f"{a}/{b}")


def _unpicklable_in_child(x):
    if x:
        raise _Unpicklable(1, 2)
    return x


def test_child_errors_reach_the_parent_with_their_type_and_traceback():
    with pytest.raises(OptimisationError, match="request\\(s\\) \\[5\\]") as info:
        fork_map(_fail_in_child, [1, 2, 3])
    assert any("_fail_in_child" in note for note in info.value.__notes__)
    with pytest.raises(WorkerError, match="_Unpicklable"):
        fork_map(_unpicklable_in_child, [0, 1])
    assert not multiprocessing.active_children()


def _die_in_child(x):
    if x:
        os._exit(3)
    return x


def test_a_child_that_dies_is_reported():
    with pytest.raises(WorkerError, match="exit code 3"):
        fork_map(_die_in_child, [0, 1])


def _fail_in_parent(x):
    if x == 0:
        raise ValueError("parent slice failed")
    import time
    time.sleep(30)  # would hold the test for 30 s if the parent waited for it
    return x


def test_a_failing_parent_slice_does_not_wait_for_the_children():
    import time
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="parent slice failed"):
        fork_map(_fail_in_parent, [0, 1])
    assert time.perf_counter() - t0 < 20


def test_even_slices_cover_the_batch():
    for n in (1, 2, 3, 7, 100):
        for k in range(1, n + 1):
            parts = even_slices(n, k)
            sizes = [s.stop - s.start for s in parts]
            assert len(parts) == k and sum(sizes) == n and max(sizes) - min(sizes) <= 1
            assert [s.start for s in parts[1:]] == [s.stop for s in parts[:-1]]


def test_concat_values_keeps_batch_indices():
    def part(n, first, tag):
        t = torch.full((n, 2), float(tag))
        return ValueResult({"m": t}, {"m": t}, {"m": t}, torch.full((n,), tag),
                           [{"request": first + i, "step": 0} for i in range(n)])

    out = concat_values([part(2, 0, 1), part(3, 2, 2)], ("m",))
    assert out.steps.tolist() == [1, 1, 2, 2, 2]
    assert [r["request"] for r in out.trace] == [0, 1, 2, 3, 4]
    assert out.deltas["m"][:, 0].tolist() == [1, 1, 2, 2, 2]


def test_a_non_finite_loss_names_batch_indices_from_every_worker(llama, corpus_path, tmp_path, monkeypatch):
    """Each worker optimises a slice; its failing requests are reported by their index in the batch."""
    model, tok = llama
    poison_losses(monkeypatch)
    with pytest.raises(OptimisationError, match=r"non-finite loss at step 0 for request\(s\) \[0, 1, 2\]"):
        pipeline.edit(model, tok, _records(), method="pmet", hparams=HP.replace(v_workers=2),
                      corpus=corpus_path, cache_dir=tmp_path, progress=False)
    merged = OptimisationError.merge([OptimisationError(3, [4]), OptimisationError(1, [2]), OptimisationError(1, [0])])
    assert (merged.step, merged.requests) == (1, [0, 2])
    assert str(OptimisationError(2)) == "non-finite δ at step 2; lower v_lr or check the model"


def test_value_workers_only_on_cpu_and_at_most_one_per_request():
    cpu = torch.nn.Linear(2, 2)
    assert value_workers(cpu, HP.replace(v_workers=4), 3) == 3
    assert value_workers(cpu, HP.replace(v_workers=2), 3) == 2
    assert value_workers(cpu, HP.replace(v_workers=0), 100) == torch.get_num_threads()
    assert value_workers(torch.nn.Linear(2, 2, device="meta"), HP.replace(v_workers=4), 3) == 1


@pytest.mark.parametrize("bad", [-1, 1.5, True, 257, "2"])
def test_v_workers_out_of_range_is_refused(bad):
    with pytest.raises(HParamsError, match="v_workers"):
        HParams(layers=(1,), v_workers=bad)


@pytest.mark.parametrize("family,method", [("llama", "pmet"), ("gpt2", "memit"), ("gemma3_text", "pmet")])
def test_workers_give_the_same_edit_as_one_process(model_factory, corpus_path, tmp_path, monkeypatch, family, method):
    model, tok = model_factory(family)
    calls = []
    real = targets_mod.fork_map
    monkeypatch.setattr(targets_mod, "fork_map", lambda fn, items: calls.append(len(items)) or real(fn, items))
    one = _edit(model, tok, corpus_path, tmp_path, method)
    assert calls == []
    two = _edit(model, tok, corpus_path, tmp_path, method, hp=HP.replace(v_workers=2))
    assert calls == [2]
    assert one.deltas.keys() == two.deltas.keys()
    for name in one.deltas:
        err = float((one.deltas[name] - two.deltas[name]).norm())
        assert err <= 1e-4 * float(one.deltas[name].norm()), (name, err)
    assert one.steps == two.steps
    key = lambda r: (r["request"], r["step"])  # noqa: E731
    assert sorted(map(key, one.traces)) == sorted(map(key, two.traces))
    for a, b in zip(sorted(one.traces, key=key), sorted(two.traces, key=key)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_bar_comes_from_the_calling_process_only(llama, corpus_path, tmp_path, monkeypatch, workers):
    bars = []

    class Bar:
        def __init__(self, *args, **kwargs):
            bars.append(kwargs.get("desc"))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            pass

    monkeypatch.setattr(optimise_mod, "tqdm", Bar)
    model, tok = llama
    pipeline.edit(model, tok, _records(), method="pmet", hparams=HP.replace(v_workers=workers),
                  corpus=corpus_path, cache_dir=tmp_path, progress=True)
    # the caller's slice: all 3 requests in one process, the first 2 of 3 with two workers
    assert bars == [f"values ({3 if workers == 1 else 2} requests)"]
