#!/usr/bin/env bash
# Set up from scratch and run the main job on the default model and data:
# 100 CounterFact dev requests edited as one batch with PMET, evaluated before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
editledger setup
editledger sample --dataset counterfact --start 0 --n 100 --out runs/requests/counterfact-0-100.json
rm -rf runs/pmet-100
editledger edit --requests runs/requests/counterfact-0-100.json --method pmet --params params.yaml --out runs/pmet-100
cat runs/pmet-100/metrics.json
