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
    print("| method | layers | λ | clamp | steps | lr | n | opt. argmax | efficacy | generalization | specificity (pre) | score |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['layers'][0]}–{r['layers'][-1]} | {r['mom2_update_weight']:g} | {r.get('clamp_norm_factor', '')} "
              f"| {r.get('v_num_grad_steps', '')} | {r.get('v_lr', '')} | {r['n']} | {r['opt_argmax']:.2f} | {r['post']['efficacy']:.3f} "
              f"| {r['post']['generalization']:.3f} | {r['post']['specificity']:.3f} ({r['pre']['specificity']:.3f}) | {r['post']['score']:.3f} |")


if __name__ == "__main__":
    app()
