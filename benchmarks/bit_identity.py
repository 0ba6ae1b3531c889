"""Do two versions of the code write the same bits?  (issue 17: a refactor changes no result)

Runs a fixed set of edits and records, for each, the sha256 of every weight delta (and, for the
ledger part, every entry id and ``deltas.safetensors`` hash).  Run it on the code before a change
and after it and compare the two files with ``--compare``:

* ``tiny``: every method × {plain, iterative, neighbour-assisted} and both engines, value workers
  and a bfloat16 value copy, on tiny random models of several families (built from configs, as the
  tests build them; about a minute);
* ``smollm2``: the bundled SmolLM2-135M settings on CounterFact dev records: PMET on the
  100-request benchmark batch (0-99), MEMIT on 0-19;
* ``ledger``: a real project (a ``git clone`` of ``--repo``) on SmolLM2: three PMET batches of 10
  (records 0-9, 10-19, 20-29) through the ``keys_values`` and ``apply`` stages of the pipeline.

``--float32`` overrides the bundled ``v_dtype``/``cov_dtype`` (bfloat16 for PMET) with float32,
for CPUs without bfloat16 dot products (no AVX512-BF16/AMX), where a bfloat16 matmul is emulated
and about 30× slower than a float32 one; the tiny part covers the bfloat16 path.

The code measured is whatever ``import pipeline`` finds: set ``PYTHONPATH`` to another checkout
to measure it (the ledger part's stage commands inherit the environment).

    PYTHONPATH=../baseline python benchmarks/bit_identity.py --part tiny --part smollm2 --part ledger \\
        --repo ../baseline --out benchmarks/results/bit_identity/before.json
    python benchmarks/bit_identity.py --part tiny --part smollm2 --part ledger --out .../after.json
    python benchmarks/bit_identity.py --compare .../before.json .../after.json
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import typer

app = typer.Typer(add_completion=False)
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
COUNTERFACT = SHARED / "counterfact" / "multi_counterfact_dev.json"


def deltas_sha256(deltas: dict) -> dict[str, str]:
    """Per parameter: sha256 of the delta's bytes (dtype and shape included)."""
    out = {}
    for name in sorted(deltas):
        t = deltas[name].detach().contiguous().cpu()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def _tiny_cases():
    """(family, method, label, hparams overrides, engine) of the tiny part."""
    from pipeline.editing.methods import METHODS

    fams = ("llama", "gpt2", "gptj", "gemma3_text")
    cases = []
    for fam in fams:
        for m in METHODS:
            cases.append((fam, m, "plain", {}, "fast"))
            cases.append((fam, m, "iterative", {"iterative": True, "max_iterations": 3, "iteration_epsilon": 1e-6}, "fast"))
        for m in ("pmet", "memit", "jeep"):
            cases.append((fam, m, "reference", {}, "reference"))
            cases.append((fam, m, "neighbors1", {"neighbors": 1}, "fast"))
        cases.append((fam, "pmet", "workers2", {"v_workers": 2}, "fast"))
        cases.append((fam, "pmet", "bfloat16", {"v_dtype": "bfloat16", "v_attention": "eager"}, "fast"))
        cases.append((fam, "jeep", "grouped", {"v_attention": "grouped"}, "fast"))
    return cases


def _neighbour_records(records: list[dict]) -> list[dict]:
    recs = copy.deepcopy(records)
    for rec in recs:
        rw = rec["requested_rewrite"]
        samples = [{"subject": s, "prompt": rw["prompt"]} for s in ("Montesquieu", "Toko Yasuda", "Rome", "Paris")]
        rec["neighborhood_samples"] = samples
        rec["neighborhood_prompts"] = [x["prompt"].replace("{}", x["subject"]) for x in samples]
    return recs


def run_tiny() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import CORPUS_TEXT, COUNTERFACT_RECORDS, make_model, tok_for  # noqa: E402

    import pipeline
    from pipeline.editing.hparams import HParams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread (restored: the SmolLM2 part runs with the machine's)
    tmp = Path(tempfile.mkdtemp(prefix="bitid-"))
    corpus = tmp / "corpus.txt"
    corpus.write_text(CORPUS_TEXT, encoding="utf-8")
    out = {}
    models: dict = {}
    for fam, method, label, over, engine in _tiny_cases():
        if fam not in models:
            models[fam] = make_model(fam)
        model, tok = copy.deepcopy(models[fam]), tok_for(fam)
        jeep = method.startswith("jeep")
        base = dict(layers=(1, 2), v_num_grad_steps=5, v_lr=0.5, mom2_update_weight=100.0, loss_stop=1e-6,
                    clamp_norm_factor=3.0, context_starters=("The",), context_length=3, cov_max_length=32,
                    kl_factor=0.5, nll_weight_after_argmax=0.1 if method.startswith("pmet") else None)
        if jeep:
            base.update(layers=(0, 1), high_layers=(2, 3), high_clamp_norm_factor=0.5)
        hp = HParams(**{**base, **over})
        records = COUNTERFACT_RECORDS[:3]
        if hp.neighbors:
            records = _neighbour_records(records)
        torch.manual_seed(0)
        res = pipeline.edit(model, tok, copy.deepcopy(records), method=method, hparams=hp, corpus=corpus,
                            cache_dir=tmp / "cov", engine=engine, progress=False)
        out[f"{fam}/{method}/{label}"] = {"deltas": deltas_sha256(res.deltas), "steps": res.steps,
                                          "iterations": len(res.iterations)}
    torch.set_num_threads(threads)
    return out


def _records(start: int, n: int) -> list[dict]:
    return json.loads(COUNTERFACT.read_text())[start : start + n]


FLOAT32 = {"v_dtype": "float32", "cov_dtype": "float32"}


def run_smollm2(overrides: dict) -> dict:
    import pipeline
    from pipeline.editing.engine import default_corpus
    from pipeline.editing.hparams import load_hparams
    from pipeline.models.loading import load_model

    lm = load_model()
    out = {}
    for method, n in (("pmet", 100), ("memit", 20)):
        torch.manual_seed(0)
        hp = load_hparams("smollm2-135m-instruct", method, overrides)
        t0 = time.perf_counter()
        res = pipeline.edit(lm.model, lm.tokenizer, _records(0, n), method=method, hparams=hp, corpus=default_corpus(),
                            fingerprint=lm.fingerprint, progress=False)
        out[f"smollm2/{method}/n{n}"] = {"deltas": deltas_sha256(res.deltas), "steps": res.steps,
                                         "seconds": time.perf_counter() - t0}
        print(f"smollm2 {method} n{n}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def _sh(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def run_ledger(repo: Path, overrides: dict) -> dict:
    """Three PMET batches of 10 through the pipeline's stages, in a clone of ``repo``."""
    bindir = Path(sys.executable).parent
    work = Path(tempfile.mkdtemp(prefix="bitid-ledger-", dir=ROOT.parent))  # ../shared/data resolves from here
    clone = work / "main"
    _sh(["git", "clone", "-q", str(repo.resolve()), str(clone)], work)
    os.symlink(SHARED.parent, work / "shared")
    import yaml

    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["edit"]["overrides"] = overrides
    params["guard"] = {"max_ppl_ratio": None}  # as the code before the guard was on by default
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = str(bindir / "dvc")
    _sh([dvc, "repro", "-q", "model", "data"], clone)
    _sh([dvc, "repro", "-q", "--glob", "covariance*"], clone)
    el = str(bindir / "editledger")
    for start in (0, 10, 20):
        req = work / f"req-{start}.json"
        req.write_text(json.dumps(_records(start, 10)))
        _sh([el, "add", "--requests", str(req), "--method", "pmet"], clone)
    out = {}
    for d in sorted(p for p in (clone / "ledger").iterdir() if p.is_dir()):
        for stage in ("keys-values", "apply"):
            _sh([el, "stage", stage, "--batch", str(d)], d)
        state = json.loads((d / "state.json").read_text())
        out[f"ledger/{d.name}"] = {"id": state["id"], "deltas_file": state["files"]["deltas.safetensors"],
                                   "after": state["fingerprints"]["after"]["model"]}
    return out


@app.command()
def main(part: list[str] = typer.Option([]), repo: Path = ROOT, out: Path = typer.Option(None), float32: bool = False,
         compare: list[Path] = typer.Option([], help="two result files (give --compare twice)")):
    if compare:
        if len(compare) != 2:
            raise typer.BadParameter("--compare takes two files")
        a, b = (json.loads(p.read_text())["results"] for p in compare)
        keys = sorted(set(a) | set(b))
        same = [k for k in keys if k in a and k in b and _bits(a[k]) == _bits(b[k])]
        differ = [k for k in keys if k not in same]
        print(f"{len(same)} of {len(keys)} cases bit-identical")
        for k in differ:
            print(f"  differs: {k}")
        raise typer.Exit(1 if differ else 0)
    import pipeline

    over = FLOAT32 if float32 else {}
    doc = {"code": str(Path(pipeline.__file__).resolve().parents[1]), "overrides": over, "results": {}}
    if out and out.exists():  # a part already measured is kept: the parts can run one at a time
        doc["results"] = json.loads(out.read_text())["results"]
    for p in part:
        t0 = time.perf_counter()
        doc["results"].update(run_tiny() if p == "tiny" else run_smollm2(over) if p == "smollm2" else run_ledger(repo, over))
        doc[f"{p}_seconds"] = time.perf_counter() - t0
        if out:  # after every part, so that a later failure loses nothing
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        print(f"{p}: {doc[f'{p}_seconds']:.0f} s")


def _bits(row: dict) -> dict:
    """What must be identical: everything but timings."""
    return {k: v for k, v in row.items() if k != "seconds"}


if __name__ == "__main__":
    app()
