"""Render sweep results (JSON lines from sweep.py) as a Markdown table, best score first.

    python benchmarks/sweep_table.py benchmarks/results/sweep_smollm2_round1.jsonl
"""

import json
from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command()
def main(paths: list[Path]):
    rows = [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: (r["method"], -r["post"]["score"]))
    print("| method | layers | λ | clamp | steps | lr | kl stop | n | mean steps | values s/edit (threads) | opt. argmax "
          "| efficacy | generalization | specificity (pre) | score |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['layers'][0]}–{r['layers'][-1]} | {r['mom2_update_weight']:g} | {r.get('clamp_norm_factor', '')} "
              f"| {r.get('v_num_grad_steps', '')} | {r.get('v_lr', '')} | {r.get('kl_stop', '')} | {r['n']} | {_steps(r)} "
              f"| {_speed(r)} | {r['opt_argmax']:.2f} | {r['post']['efficacy']:.3f} "
              f"| {r['post']['generalization']:.3f} | {r['post']['specificity']:.3f} ({r['pre']['specificity']:.3f}) | {r['post']['score']:.3f} |")


def _steps(r: dict) -> str:
    return f"{r['mean_steps']:.1f}" if "mean_steps" in r else ""


def _speed(r: dict) -> str:
    """Value-optimisation seconds per edit; rows from before the thread count was recorded show ?."""
    return f"{r['values_s'] / r['n']:.2f} ({r.get('threads', '?')})" if "values_s" in r else ""


if __name__ == "__main__":
    app()
