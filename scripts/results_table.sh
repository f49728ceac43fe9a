#!/usr/bin/env bash
# Runs the docs/RESULTS.md sweep on the embedded MiniLM: LoRA, R-LoRA, GM-LoRA
# and RM-LoRA (rank 8, r_hat 4) and PEFT's LoRA as an anchor, over seeds, on
# the tasks given (default: sst2 on a fixed 2,000-example training subset).
# Finished runs (with a results.json) are skipped, so it can be restarted.
#
#   bash scripts/results_table.sh "sst2 cola" "0 1 2"
set -euo pipefail
cd "$(dirname "$0")/.."
tasks=${1:-sst2}
seeds=${2:-"0 1 2"}
subset=${SUBSET:-2000}
py=.venv/bin/python
for task in $tasks; do
  for seed in $seeds; do
    for method in lora r_lora gm_lora rm_lora peft_lora; do
      workdir=runs/table/${task}_${method}_s${seed}
      [ -f "$workdir/results.json" ] && continue
      args=(--config=configs/${task}.py:model=minilm --config.data.dir=../shared/data/glue
            --config.seed=$seed --config.workdir=$workdir --config.progress=False)
      [ "$task" != rte ] && args+=(--config.data.train_subset=$subset)
      if [ "$method" = peft_lora ]; then
        $py -m experiments.peft_glue "${args[@]}" --config.method=lora
      else
        $py -m experiments.glue "${args[@]}" --config.method=$method
      fi
    done
  done
done
$py -m experiments.collect_results 'runs/table/*/results.json'
