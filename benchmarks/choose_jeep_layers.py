"""Pick JEEP's high region for a model from its contrast logit lens table.

    editledger probe logit-lens --n 100 --out benchmarks/results/probes
    python benchmarks/choose_jeep_layers.py benchmarks/results/probes/logit_lens.parquet --width 3 --above 5

Writes ``jeep_layers.json`` beside the table: the chosen window (pipeline.probes.choose), the
contrast per layer at both positions and the growth of every candidate window.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.probes.choose import contrast_curve, promotion_window  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table", type=Path)
    ap.add_argument("--width", type=int, default=3, help="layers in the high region (paper: 2 for GPT-J, 3 for LLaMA)")
    ap.add_argument("--above", type=int, default=5, help="last layer of the low region")
    ap.add_argument("--exclude-last", type=int, default=2, help="final layers left out (distribution normalisers)")
    args = ap.parse_args(argv)
    df = pd.read_parquet(args.table)
    layers, growth = promotion_window(df, args.width, args.above, args.exclude_last)
    rank = df.groupby(["position", "answer", "layer"])["rank"].median().unstack("layer")
    doc = {"high_layers": layers, "width": args.width, "above": args.above, "exclude_last": args.exclude_last,
           "records": int(df["record"].nunique()),
           "contrast_prediction": contrast_curve(df, "prediction").round(4).tolist(),
           "contrast_subject_last": contrast_curve(df, "subject_last").round(4).tolist(),
           "window_growth": {int(k): round(v, 4) for k, v in growth.items()},
           "median_rank": {f"{p}/{a}": rank.loc[(p, a)].tolist() for p, a in rank.index}}
    out = args.table.parent / "jeep_layers.json"
    out.write_text(json.dumps(doc, indent=1))
    print(f"high region {layers} (contrast growth {growth.max():.3f}); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
