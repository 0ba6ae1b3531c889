"""benchmarks/compare_methods.py starts: variants parse, settings resolve, bad input is refused."""

from __future__ import annotations

import json
import os

import pytest
from benchmark_support import load_benchmark


@pytest.fixture(scope="module")
def cm():
    return load_benchmark("compare_methods")


def test_dry_run_resolves_every_default_variant(cm, capsys):
    assert cm.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for v in cm.DEFAULT_VARIANTS:
        assert f"  {v}: method" in out
    assert "SMOKE RUN" not in out and "in 3 sequential batch(es) of 100" in out
    assert "'iterative'" in out and "'neighbors'" in out
    assert cm.main(["--dry-run", "--n", "5", "--batch", "5", "--variants", "pmet,jeep+nap"]) == 0
    assert "SMOKE RUN" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["--variants", "rome"], "unknown method 'rome'"),
    (["--variants", "pmet+turbo"], "unknown modifier"),
    (["--n", "250"], "multiple of --batch"),
    (["--variants", "pmet+na", "--neighbors", "11"], "neighbors must be"),
])
def test_bad_arguments_are_refused(cm, args, match):
    with pytest.raises((SystemExit, ValueError), match=match):
        cm.main(["--dry-run", *args])


def test_parse_variant(cm):
    assert cm.parse_variant("pmet", 1) == ("pmet", {})
    assert cm.parse_variant("jeep+iterative+nap", 2) == ("jeep", {"iterative": True, "neighbors": 2,
                                                                 "neighbor_prefixes": True})


def test_table_is_assembled_from_the_row_files_present(cm, tmp_path, capsys):
    """Each variant's row is its own file: a rerun skips it and the table names what is missing."""
    args = ["--n", "5", "--batch", "5", "--variants", "pmet,pmet+na,memit", "--out", str(tmp_path)]
    rows = tmp_path / "compare_methods_smoke_n5_b5"
    rows.mkdir()
    (rows / "unedited.json").write_text('{"variant": "unedited", "efficacy": 0.25, "threads": 2}')
    (rows / "pmet_plus_na.json").write_text('{"variant": "pmet+na", "efficacy": 0.75, "avg_iterations": 1.0}')
    assert cm.main(["--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert "pmet+na: method pmet" in out and out.count("done (row file present)") == 1 and out.count("to run") == 2
    assert cm.main(["--table-only", *args]) == 0
    md = (tmp_path / "compare_methods_smoke_n5_b5.md").read_text()
    assert "**not run yet:** pmet, memit" in md
    assert "| unedited | 0.250 |" in md and "| pmet+na | 0.750 |" in md
    assert [r["variant"] for r in json.loads((tmp_path / "compare_methods_smoke_n5_b5.json").read_text())["rows"]] == [
        "unedited", "pmet+na"]


def test_claims_let_several_processes_share_one_list(cm, tmp_path):
    import subprocess
    import sys

    assert cm.claim(tmp_path, "pmet+na", force=False)  # free: taken
    assert cm.claim(tmp_path, "pmet+na", force=False)  # held by this very process: still ours
    lock = cm.row_file(tmp_path, "pmet+na").with_suffix(".claim")
    lock.write_text(str(os.getppid()))  # a live process holds it
    assert not cm.claim(tmp_path, "pmet+na", force=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())  # its holder died: taken over
    assert cm.claim(tmp_path, "pmet+na", force=False)
    cm.row_file(tmp_path, "memit").write_text("{}")  # done
    assert not cm.claim(tmp_path, "memit", force=False) and cm.claim(tmp_path, "memit", force=True)
