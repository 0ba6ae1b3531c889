"""benchmarks/lifelong.py assembles its table from the files a (possibly unfinished) history left."""

from __future__ import annotations

import json

import pytest
from benchmark_support import load_benchmark


@pytest.fixture(scope="module")
def ll():
    return load_benchmark("lifelong")


def _row(batch: int, eff: float, retained: float | None) -> dict:
    m = {"efficacy": eff, "generalization": 0.5, "specificity": 0.75, "score": 0.6}
    return {"batch": batch, "edits": 2 * batch, "edit_s": 10.0, "eval_s": 2.0, "mean_steps": 20.0, "own": m,
            "retention_n": 0 if retained is None else 2,
            "retention": None if retained is None else {**m, "efficacy": retained}}


def test_table_reports_finished_and_unfinished_histories(ll, tmp_path):
    rdir = ll.run_dir(tmp_path, 4, 2, 0)
    assert rdir.name == "lifelong_smoke_n4_b2_s0"
    for m in ("pmet", "memit"):
        (rdir / m).mkdir(parents=True)
    (rdir / "unedited.json").write_text(json.dumps({"efficacy": 0.25, "me_ppl_50": 94.0, "eval_s": 5.0}))
    for r in (_row(1, 1.0, None), _row(2, 0.5, 0.25)):
        ll.append_jsonl(rdir / "pmet" / "curve.jsonl", r)
    (rdir / "pmet" / "final.json").write_text(json.dumps({"metrics": {"efficacy": 0.75, "fluency": 6.1}, "eval_s": 6.0}))
    ll.append_jsonl(rdir / "memit" / "curve.jsonl", _row(1, 1.0, None))  # interrupted after batch 1
    md = ll.write_table(rdir, ["pmet", "memit"], 4, 2).read_text()
    assert md.startswith("# SMOKE RUN")
    assert "| pmet | 2 | 0.750 | — | — | — | 6.100 | — | 30.000 |" in md  # 2 × (10 + 2) s + final 6 s
    assert "| memit | 1 | — |" in md
    assert "| pmet | 2 | 4 | 0.500 | 0.500 | 2 | 0.250 |" in md and "| memit | 1 | 2 | 1.000 | 0.500 | 0 | — |" in md


def test_a_history_resumes_only_with_the_settings_it_started_with(ll, tmp_path):
    import subprocess

    from pipeline.editing.hparams import HParams

    repo = tmp_path / "repo"
    (repo / "pipeline").mkdir(parents=True)
    (repo / "pipeline" / "engine.py").write_text("x = 1\n")
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo, check=True,  # noqa: E731
                                    capture_output=True)
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    path = tmp_path / "results" / "run" / "pmet" / "settings.json"
    path.parent.mkdir(parents=True)
    hp = HParams(layers=(1, 2))
    ll.check_settings(path, hp, resuming=False, root=repo)
    saved = json.loads(path.read_text())
    assert saved["hparams"]["layers"] == [1, 2] and len(saved["commit"]) == 40
    ll.check_settings(path, hp, resuming=True, root=repo)  # same settings: fine, file untouched
    assert json.loads(path.read_text()) == saved
    with pytest.raises(SystemExit, match="other hyper-parameters \\(v_attention, v_num_grad_steps\\)"):
        ll.check_settings(path, hp.replace(v_num_grad_steps=3, v_attention="eager"), resuming=True, root=repo)
    (repo / "README.md").write_text("docs change\n")  # outside pipeline/: the history's code is the same
    ll.check_settings(path, hp, resuming=True, root=repo)
    (repo / "pipeline" / "engine.py").write_text("x = 2\n")  # the engine changed, committed or not
    with pytest.raises(SystemExit, match=r"pipeline/ has changed since \(pipeline/engine.py\).*worktree add"):
        ll.check_settings(path, hp, resuming=True, root=repo)
    git("commit", "-qam", "engine")
    with pytest.raises(SystemExit, match="pipeline/ has changed"):
        ll.check_settings(path, hp, resuming=True, root=repo)
    ll.check_settings(path, hp, resuming=True, root=repo, editing_left=False)  # only the final evaluation is left
    older = json.loads(path.read_text())
    del older["hparams"]["cov_max_tokens"]  # written before that field existed: read as its default
    path.write_text(json.dumps(older))
    ll.check_settings(path, hp, resuming=True, root=repo, editing_left=False)
    with pytest.raises(SystemExit, match=r"other hyper-parameters \(cov_max_tokens\)"):
        ll.check_settings(path, hp.replace(cov_max_tokens=1000), resuming=True, root=repo, editing_left=False)
    path.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="other hyper-parameters"):  # but never with other settings
        ll.check_settings(path, hp.replace(v_num_grad_steps=3), resuming=True, root=repo, editing_left=False)
    assert json.loads(path.read_text()) == saved


def test_norm_growth_is_measured_against_the_base_weights_and_tabled(ll, tmp_path):
    import torch

    base = {"w": torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.bfloat16), "untouched": torch.ones(2)}
    edited = {"w": torch.tensor([[6.0, 0.0], [0.0, 8.0]], dtype=torch.bfloat16)}  # doubled: ‖ΔW‖ = ‖W₀‖
    g = ll.weight_growth(base, edited)
    assert list(g) == ["w"]  # only what the history changed
    assert g["w"] == {"norm_before": 5.0, "norm_after": 10.0, "relative_change": 1.0}
    rdir = ll.run_dir(tmp_path, 4, 2, 0)
    (rdir / "pmet").mkdir(parents=True)
    (rdir / "pmet" / "growth.json").write_text(json.dumps(g))
    md = ll.write_table(rdir, ["pmet", "memit"], 4, 2).read_text()
    assert "| pmet | w | 5.0 | 10.0 | 1.000 |" in md
    assert "| memit |" not in md.split("Norm growth")[1]


def test_streams_are_labelled_and_variants_resolve(ll, tmp_path):
    assert [ll.stream_label(*x) for x in ((2000, 100, 0), (500, 1, 0), (300, 100, 10000), (40, 20, 0))] == [
        "", "", "tuning", "smoke"]
    assert ll.run_dir(tmp_path, 300, 100, 10000).name == "lifelong_tuning_n300_b100_s10000"
    method, hp = ll.variant_hparams("pmet+ns", "smollm2-135m-instruct", {"v_dtype": "float32"})
    assert method == "pmet" and hp.solver == "null_space" and hp.v_dtype == "float32" and hp.clamp_norm_factor == 3.0
    with pytest.raises(Exception, match=r"unknown variant 'pmet\+zz'"):
        ll.variant_hparams("pmet+zz", "smollm2-135m-instruct", {})


def test_a_batchs_saved_targets_replay_to_the_same_deltas(ll, llama, corpus_path, tmp_path):
    """The committed ``targets/NNNN.safetensors`` are what a new session rebuilds a stream from."""
    import copy

    import torch

    import pipeline
    from conftest import COUNTERFACT_RECORDS
    from test_constrained import HP

    model, tok = llama
    hp = HP.replace(solver="null_space", null_space_share=0.9, null_space_alpha=1e-4)
    run = lambda **kw: pipeline.edit(model, tok, copy.deepcopy(COUNTERFACT_RECORDS[:3]), method="jeep-separate",  # noqa: E731
                                     hparams=hp.replace(layers=(0, 1), high_layers=(2, 3)), corpus=corpus_path,
                                     cache_dir=tmp_path, progress=False, **kw)
    res = run()
    ll.save_targets(tmp_path / "targets" / "0001.safetensors", res)
    replay = ll.load_targets(tmp_path / "targets" / "0001.safetensors")
    assert len(replay.stored) == 2 and replay.prefixes == res.prefixes  # separate optimisation: two passes
    again = run(replay=replay)
    assert set(again.deltas) == set(res.deltas) and all(torch.equal(again.deltas[k], res.deltas[k]) for k in res.deltas)


def test_a_checkpoint_round_trips_weights_and_history(ll, tmp_path):
    import torch

    state = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(2, 2)}
    history = {"mlp_out@1": torch.randn(4, 4, dtype=torch.float64)}
    ll.save_checkpoint(tmp_path / "c.safetensors", state, {"a.weight"}, history)
    weights, again = ll.load_checkpoint(tmp_path / "c.safetensors")
    assert set(weights) == {"a.weight"} and torch.equal(weights["a.weight"], state["a.weight"])
    assert set(again) == set(history) and torch.equal(again["mlp_out@1"], history["mlp_out@1"])
    assert ll.norm_ratios({"w": 2 * torch.ones(2)}, {"w": torch.ones(2)}, {"w"}) == {"w": 2.0}


def test_a_longer_stream_is_seeded_with_the_batches_a_shorter_one_made_on_the_same_records(ll, tmp_path):
    src = tmp_path / "lifelong_n2000_b100_s0" / "memit+joint"
    (src / "targets").mkdir(parents=True)
    rows = [{"batch": b, "edits": 100 * b} for b in (1, 2)]
    (src / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (src / "settings.json").write_text('{"hparams": {}, "commit": "abc"}\n')
    for b in (1, 2):
        (src / "targets" / f"{b:04d}.safetensors").write_bytes(b"t%d" % b)
    dst = tmp_path / "lifelong_n10000_b100_s0" / "memit+joint"
    ll.seed_variant(src, dst, 10000, 100, 0)
    assert ll.read_jsonl(dst / "curve.jsonl") == rows
    assert (dst / "targets" / "0002.safetensors").read_bytes() == b"t2"
    assert (dst / "settings.json").read_text() == (src / "settings.json").read_text()
    for n, batch, start in ((10000, 1, 0), (1000, 100, 0), (10000, 100, 10000)):  # not its first batches
        with pytest.raises(ll.typer.BadParameter, match="not the first batches"):
            ll.seed_variant(src, tmp_path / "other" / "memit+joint", n, batch, start)


def test_a_recorded_stream_is_spread_again_under_other_rule_settings(ll, llama, corpus_path, tmp_path):
    """benchmarks/replay_sweep.py: the recorded settings give the recorded history back bit for bit;
    a larger λ spreads the same targets into smaller updates."""
    import copy

    import torch

    import pipeline
    from benchmark_support import load_benchmark
    from conftest import COUNTERFACT_RECORDS
    from pipeline.editing.history import extended
    from test_constrained import HP

    sweep = load_benchmark("replay_sweep")
    model, tok = llama
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reqs = copy.deepcopy(COUNTERFACT_RECORDS[:4])
    hp = HP.replace(solver="joint")
    kw = dict(corpus=corpus_path, cache_dir=tmp_path / "cov")
    history, stored = {}, []
    for b in range(2):  # a two-batch stream, recorded as benchmarks/lifelong.py records it
        res = pipeline.edit(model, tok, reqs[2 * b:2 * b + 2], method="memit", hparams=hp, apply=True,
                            fingerprint="fp", progress=False, history=history or None, **kw)  # base covariance
        history = extended(history, res.keys)
        stored.append(tmp_path / "targets" / f"{b + 1:04d}.safetensors")
        ll.save_targets(stored[-1], res)
    recorded = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        curves = {}
        for lam in (hp.mom2_update_weight, 100 * hp.mom2_update_weight):
            model.load_state_dict(base)
            curves[lam] = sweep.spread_history(model, tok, "fp", pipeline.parse_requests(copy.deepcopy(reqs)),
                                               stored, "memit", hp.replace(mom2_update_weight=lam), 2, base,
                                               lambda: 1.0, 2, **kw)
            if lam == hp.mom2_update_weight:
                assert all(torch.equal(v, recorded[k]) for k, v in model.state_dict().items())
        small, large = curves.values()
        assert [r["edits"] for r in small] == [2, 4] and [r["me_ppl_50"] for r in small] == [None, 1.0]
        assert large[-1]["max_norm_ratio"] - 1 < small[-1]["max_norm_ratio"] - 1
    finally:
        model.load_state_dict(base)
