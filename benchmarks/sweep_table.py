"""Render sweep results (JSON lines from sweep.py) as a Markdown table, best score first."""

import json
import sys

rows = [json.loads(line) for path in sys.argv[1:] for line in open(path) if line.strip()]
rows.sort(key=lambda r: (r["method"], -r["post"]["score"]))
print("| method | layers | λ | clamp | steps | lr | n | opt. argmax | efficacy | generalization | specificity (pre) | score |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['method']} | {r['layers'][0]}–{r['layers'][-1]} | {r['mom2_update_weight']:g} | {r.get('clamp_norm_factor', '')} "
          f"| {r.get('v_num_grad_steps', '')} | {r.get('v_lr', '')} | {r['n']} | {r['opt_argmax']:.2f} | {r['post']['efficacy']:.3f} "
          f"| {r['post']['generalization']:.3f} | {r['post']['specificity']:.3f} ({r['pre']['specificity']:.3f}) | {r['post']['score']:.3f} |")
