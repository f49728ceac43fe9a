#!/usr/bin/env bash
# The SQuAD rows of docs/RESULTS.md on the embedded MiniLM: LoRA, RM-LoRA,
# AdaLoRA and PEFT's LoRA (rank 8), two single-threaded runs at a time.
# Trains on $SUBSET questions of the first 28 articles of the shared file,
# evaluates on its last 4 articles; $EPOCHS epochs, seed $SEED.
#
#   bash scripts/squad_runs.sh            # logs and results under runs/squad/
set -euo pipefail
cd "$(dirname "$0")/.."
SUBSET=${SUBSET:-3000}; EPOCHS=${EPOCHS:-1}; SEED=${SEED:-0}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
export OMP_NUM_THREADS=1
mkdir -p runs/squad
run() {
  local method=$1 entry=experiments.squad name=$1
  [ "$method" = peft_lora ] && { entry=experiments.peft_squad; method=lora; }
  local workdir=runs/squad/${name}_s${SEED}
  [ -f "$workdir/results.json" ] && return 0
  .venv/bin/python -m $entry --config=configs/squad.py:model=minilm --config.method=$method \
    --config.data.dir=../shared/data/squad --config.data.train_subset=$SUBSET --config.num_epochs=$EPOCHS \
    --config.seed=$SEED --config.workdir=$workdir --config.progress=False > $workdir.log 2>&1
}
(run lora; run rm_lora) &
(run peft_lora; run adalora) &
wait
