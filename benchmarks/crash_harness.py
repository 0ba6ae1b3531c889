"""Crash harness: SIGKILL `editledger add`, the `apply` stage and `editledger revert` mid-flight.

On the test suite's tiny project (tiny random Llama, fake shared data; see tests/pipeline_support.py)
it repeats a cycle of four interrupted operations —

1. ``editledger add --requests F``          (a new edit batch)
2. ``editledger stage apply --batch DIR``   (the edit batch; its keys_values stage ran normally)
3. ``editledger revert SEQ``                (back to the state before that batch)
4. ``editledger stage apply --batch DIR``   (the revert batch)

— each as a real process that is killed with SIGKILL, either at a named point of the write path
(``EDITLEDGER_CRASH_AT``, see pipeline/ledger/faults.py: between a temp file and its rename, after
the deltas but before the commit record, ...) or after a random delay.  After every kill it checks:

* ``editledger verify --replay`` passes (hash chain, files, bit-exact replay of the weights);
* no half-written entry exists or is active: every batch directory has complete inputs, and every
  batch without ``state.json`` is outside the active state;
* rerunning the interrupted command (unless the kill came after its commit point) completes the
  work, and leaves no temporary file or directory behind.

A kill "survives" when all of these hold.  Results (kills attempted/survived, per phase, per kill
mode and point, where the kills landed) go to a JSON file.

    python benchmarks/crash_harness.py --kills 100 --seed 0 --out benchmarks/results/crash_harness.json
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny project of the test suite

from pipeline_support import BIN, RECORDS, env as child_env  # noqa: E402
from reliability_support import add_batch, build_project, cli, requests_file  # noqa: E402

from pipeline.ledger import active_chain, read_batch, read_requests, scan  # noqa: E402
from pipeline.ledger.store import load  # noqa: E402
from pipeline.ledger.faults import CRASH_ENV  # noqa: E402
from pipeline.ledger.layout import STATE_FILE, TMP_PREFIX  # noqa: E402

PHASES = ("add", "apply", "revert")
ADD_POINTS = ("lock:acquired", "tmp:batch.yaml", "renamed:batch.yaml", "tmp:requests.parquet", "tmp:dvc.yaml",
              "batch:before-rename", "batch:renamed")
REVERT_POINTS = ("lock:acquired", "tmp:batch.yaml", "tmp:dvc.yaml", "batch:before-rename", "batch:renamed")
APPLY_EDIT_POINTS = ("tmp:entry.json", "renamed:entry.json", "tmp:deltas.safetensors", "renamed:deltas.safetensors",
                     "commit:before-state", "tmp:state.json", "renamed:state.json")
APPLY_REVERT_POINTS = ("tmp:entry.json", "renamed:entry.json", "commit:before-state", "tmp:state.json",
                       "renamed:state.json")
DELAY_WINDOW = (0.8, 1.0)  # random delays: from 0.8 × the first ledger change to 1.0 × the end of a clean run


class HarnessFailure(AssertionError):
    """An invariant did not hold after a kill (the ledger did not survive it); the in-process
    ``cli`` helper raises its base class, AssertionError, for a command that failed."""


# ------------------------------------------------------------------------------------- processes

def launch(repo: Path, args: list[str], crash_at: str | None) -> subprocess.Popen:
    env = child_env(EDITLEDGER_ROOT=str(repo))
    env.pop(CRASH_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return subprocess.Popen([str(BIN / "editledger"), *args], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def ledger_files(ledger: Path) -> set[str]:
    return {str(p.relative_to(ledger)) for p in ledger.rglob("*")}


def is_temp(rel: str) -> bool:
    return any(part.startswith(TMP_PREFIX) or (part.startswith(".") and ".tmp-" in part) for part in Path(rel).parts)


# ------------------------------------------------------------------------------------ the checks

def check_ledger(repo: Path, *, replay: bool) -> str:
    """The invariants that must hold at any moment, crash or not; returns verify's message."""
    ledger = repo / "ledger"
    out = cli(repo, "verify", *(["--replay"] if replay else [])).stdout
    if not out.startswith("ok:"):
        raise HarnessFailure(f"verify: {out}")
    chain, states = load(ledger)
    committed, ids = {e.dirname for e in chain}, {e.id for e in chain}
    for d in scan(ledger):
        batch = read_batch(d.path)  # complete inputs: a batch directory never appears half-written
        if batch.kind == "edit":
            read_requests(d.path)
        if d.committed != (d.name in committed):
            raise HarnessFailure(f"{d.name}: state.json present but not read as an entry, or vice versa")
    for e, state in zip(chain, states):  # (the manifest's record of this set is checked by verify)
        if not set(state.active) <= ids:
            raise HarnessFailure(f"{e.dirname}: lists an active entry that is not committed")
    if any(e.dirname not in committed for e in active_chain(ledger)):
        raise HarnessFailure("an uncommitted batch is active")
    return out.strip()


def check_clean(repo: Path) -> None:
    left = sorted(r for r in ledger_files(repo / "ledger") if is_temp(r))
    if left:
        raise HarnessFailure(f"temporary files left after the rerun: {left}")


# ------------------------------------------------------------------------------------- the steps

@dataclass
class Step:
    """One interrupted operation: what to run, which points apply, how to tell that it finished."""

    phase: str
    args: list[str]  # the command; rerun as it is when the kill came before its commit point
    points: tuple[str, ...]
    done: Callable[[], bool]
    label: str


@dataclass
class Stats:
    kills: int = 0
    survived: int = 0
    modes: Counter = field(default_factory=Counter)
    points: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    reruns: int = 0
    completed_before_kill: int = 0

    def to_dict(self) -> dict:
        return {"kills": self.kills, "survived": self.survived, "modes": dict(self.modes),
                "points": dict(sorted(self.points.items())), "outcomes": dict(self.outcomes),
                "reruns": self.reruns, "completed_before_kill": self.completed_before_kill}


def outcome(before: set[str], after: set[str], done: bool) -> str:
    """Where the kill landed, judged from the files it left."""
    new = after - before
    if done:
        return "after-commit-point"
    if not new:
        return "before-any-write"
    if all(is_temp(r) for r in new):
        return "temp-files-only"
    return "partial-outputs"


class Harness:
    def __init__(self, repo: Path, seed: int, timings: dict[str, tuple[float, float]]):
        self.repo, self.ledger = repo, repo / "ledger"
        self.rng = random.Random(seed)
        self.timings = timings
        self.stats = {p: Stats() for p in PHASES}
        self.failures: list[str] = []
        self.launched = 0
        self._record = 0
        self._points: dict[str, list[str]] = {}

    # -- the four steps of a cycle
    def _requests(self) -> Path:
        k = self._record
        self._record += 1
        recs = [RECORDS[(2 * k) % len(RECORDS)], RECORDS[(2 * k + 1) % len(RECORDS)]]
        path = self.repo.parent / "requests" / f"crash-{k}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(recs))
        return path

    def _new_dir(self, n_before: int) -> Callable[[], bool]:
        return lambda: len(scan(self.ledger)) > n_before

    def add_step(self) -> Step:
        f = str(self._requests())
        args = ["add", "--requests", f]
        return Step("add", args, ADD_POINTS, self._new_dir(len(scan(self.ledger))), "add")

    def apply_step(self, kind: str) -> Step:
        d = scan(self.ledger)[-1]
        args = ["stage", "apply", "--batch", str(d.path)]
        points = APPLY_EDIT_POINTS if kind == "edit" else APPLY_REVERT_POINTS
        return Step("apply", args, points, lambda: (d.path / STATE_FILE).exists(), f"apply-{kind}")

    def revert_step(self) -> Step:
        target = str(len(scan(self.ledger)) - 1)  # the state before the last (edit) batch
        args = ["revert", target]
        return Step("revert", args, REVERT_POINTS, self._new_dir(len(scan(self.ledger))), "revert")

    # -- one kill
    def _kill_once(self, step: Step, mode: str, point: str | None) -> bool:
        """Run the step's command and kill it; False if it finished first (delay mode only)."""
        p = launch(self.repo, step.args, point)
        self.launched += 1
        if mode == "point":
            try:
                code = p.wait(timeout=300)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise HarnessFailure(f"{step.label}: no exit within 300 s") from None
            if code != -signal.SIGKILL:
                raise HarnessFailure(f"{step.label}: crash point {point} not reached (exit {code}): "
                                     f"{p.stderr.read()[-1500:]}")
            return True
        first_write, end = self.timings[step.label]
        try:
            code = p.wait(timeout=self.rng.uniform(DELAY_WINDOW[0] * first_write, DELAY_WINDOW[1] * end))
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            return True
        if code != 0:
            raise HarnessFailure(f"{step.label} failed without a kill ({code}): {p.stderr.read()[-1500:]}")
        return False

    def _next_point(self, step: Step) -> str:
        """The step's named points in a shuffled round robin: every point is hit, none twice in a row."""
        queue = self._points.get(step.label)
        if not queue:
            queue = self._points[step.label] = self.rng.sample(step.points, len(step.points))
        return queue.pop()

    def kill(self, step: Step) -> None:
        """One SIGKILL of ``step`` (at a random named point or after a random delay), then the checks.
        A process that finishes before its delay is not a kill: the cycle goes on from the new state
        (the ledger is append-only, so the step cannot be undone and tried again)."""
        st = self.stats[step.phase]
        before = ledger_files(self.ledger)
        mode = self.rng.choice(("point", "delay"))
        point = self._next_point(step) if mode == "point" else None
        if not self._kill_once(step, mode, point):
            st.completed_before_kill += 1
            return
        st.kills += 1
        st.modes[mode] += 1
        if point:
            st.points[point] += 1
        done = step.done()
        st.outcomes[outcome(before, ledger_files(self.ledger), done)] += 1
        try:
            check_ledger(self.repo, replay=True)
            if not done:
                cli(self.repo, *step.args)
                st.reruns += 1
                if not step.done():
                    raise HarnessFailure(f"{step.label}: the rerun did not complete the work")
            check_clean(self.repo)
            check_ledger(self.repo, replay=False)
        except AssertionError as exc:
            self.failures.append(f"{step.label} ({mode} {point or ''}): {exc}")
            raise HarnessFailure(str(exc)) from None
        st.survived += 1

    @property
    def kills(self) -> int:
        return sum(s.kills for s in self.stats.values())

    def run(self, n_kills: int) -> None:
        while self.kills < n_kills:
            for make in (self.add_step, lambda: self.keys_values() or self.apply_step("edit"), self.revert_step,
                         lambda: self.apply_step("revert")):
                if self.kills >= n_kills:
                    break
                self.kill(make())
        # leave the ledger fully computed
        last = scan(self.ledger)[-1]
        if not last.committed:
            if read_batch(last.path).kind == "edit":
                self.keys_values()
            cli(self.repo, "stage", "apply", "--batch", str(last.path))

    def keys_values(self) -> None:
        d = scan(self.ledger)[-1]
        if not (d.path / "keys_values.parquet").exists():
            cli(self.repo, "stage", "keys-values", "--batch", str(d.path))


def calibrate(repo: Path) -> dict[str, tuple[float, float]]:
    """When each command first changes the ledger and when it ends (seconds from its start, process
    start-up included), from one uninterrupted run each: random delays are drawn from
    ``DELAY_WINDOW[0] × first change .. DELAY_WINDOW[1] × end``, so that they land around the
    writes rather than mostly in the imports.  Leaves two committed edit batches and a revert."""
    ledger = repo / "ledger"
    times = {}

    def timed(label: str, args: list[str]) -> None:
        before = ledger_files(ledger)
        t0 = time.perf_counter()
        p = launch(repo, args, None)
        first = None
        while p.poll() is None:
            if first is None and ledger_files(ledger) != before:
                first = time.perf_counter() - t0
            time.sleep(0.005)
        end = time.perf_counter() - t0
        if p.returncode != 0:
            raise HarnessFailure(f"calibration {label} failed: {p.stderr.read()[-1500:]}")
        times[label] = (first if first is not None else end, end)

    add_batch(repo, "calibrate-1", RECORDS[8:9])  # in this process: a history to revert in
    timed("add", ["add", "--requests", str(requests_file(repo, "calibrate-2", RECORDS[9:10]))])
    d = scan(ledger)[-1].path
    cli(repo, "stage", "keys-values", "--batch", str(d))
    timed("apply-edit", ["stage", "apply", "--batch", str(d)])
    timed("revert", ["revert", "1"])
    timed("apply-revert", ["stage", "apply", "--batch", str(scan(ledger)[-1].path)])
    return times


def run_harness(workdir: Path, kills: int, seed: int) -> dict:
    """Build the project, calibrate, kill ``kills`` times; the results document."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    repo = build_project(workdir)
    timings = calibrate(repo)
    h = Harness(repo, seed, timings)
    error = None
    try:
        h.run(kills)
        final = check_ledger(repo, replay=True)
    except AssertionError as exc:
        error, final = str(exc), None
    return {
        "kills_attempted": h.kills,
        "kills_survived": sum(s.survived for s in h.stats.values()),
        "seed": seed,
        "processes_launched": h.launched,
        "phases": {p: s.to_dict() for p, s in h.stats.items()},
        "uninterrupted_run_s": {k: {"first_ledger_change": round(a, 3), "end": round(b, 3)}
                                for k, (a, b) in timings.items()},
        "delay_window": list(DELAY_WINDOW),
        "entries_final": len(load(repo / "ledger")[0]) if error is None else None,
        "final_verify": final,
        "error": error,
        "failures": h.failures,
        "wall_s": round(time.perf_counter() - t0, 1),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpus": os.cpu_count(), "platform": platform.platform()},
    }


app = typer.Typer(add_completion=False)


@app.command()
def main(kills: int = typer.Option(100, help="SIGKILLs to deliver (processes that finish first are not counted)"),
         seed: int = typer.Option(0), out: Path = typer.Option(Path("benchmarks/results/crash_harness.json")),
         workdir: Path = typer.Option(None, help="scratch directory (default: a new temporary one, removed)")):
    """Kill editledger writers at random points; check that the ledger survives every kill."""
    scratch = workdir or Path(tempfile.mkdtemp(prefix="editledger-crash-"))
    try:
        res = run_harness(scratch, kills, seed)
    finally:
        if workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    per = ", ".join(f"{p} {s['survived']}/{s['kills']}" for p, s in res["phases"].items())
    typer.echo(f"survived {res['kills_survived']}/{res['kills_attempted']} kills ({per}); wrote {out}")
    if res["error"] or res["kills_survived"] != res["kills_attempted"]:
        typer.echo(f"FAILED: {res['error']}", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
