#!/usr/bin/env bash
# Set up from scratch and run the main job on the default model (SmolLM2-135M-Instruct) and data:
# three batches of 10 CounterFact dev requests (records 0-9, 10-19, 20-29) appended to the ledger
# with the shipped setting of params.yaml (MEMIT, joint update rule), computed by the DVC pipeline
# (`dvc repro -P`), then the ledger log and the report.
# Re-running it adds nothing new and reruns nothing that is up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if ! ls -d ledger/0001-* >/dev/null 2>&1; then
  for start in 0 10 20; do
    editledger sample --dataset counterfact --start "$start" --n 10 --out "runs/requests/counterfact-$start-10.json"
    editledger add --requests "runs/requests/counterfact-$start-10.json"   # the shipped params.yaml setting
  done
fi
dvc repro -P
editledger log
editledger report
