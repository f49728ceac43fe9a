#!/usr/bin/env bash
# The SQuAD rows of docs/RESULTS.md on the embedded MiniLM (rank 8), two
# single-threaded runs at a time: trains on $SUBSET questions of the first 28
# articles of the shared file (seeded draw), evaluates on its last 4 articles
# (held out whole); $EPOCHS epochs, seed $SEED, every token in segment 0 (the
# embedded MiniLM was never trained on sentence pairs). Finished runs are skipped.
#
#   bash scripts/squad_runs.sh "lora peft_lora rm_lora adalora"   # runs/squad/<method>_s0/
set -euo pipefail
cd "$(dirname "$0")/.."
methods=${1:-"lora peft_lora rm_lora adalora"}
export SUBSET=${SUBSET:-2000} EPOCHS=${EPOCHS:-2} SEED=${SEED:-0}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
export OMP_NUM_THREADS=1
mkdir -p runs/squad
run_one() {
  local name=$1 method=$1 entry=experiments.squad
  [ "$name" = peft_lora ] && { entry=experiments.peft_squad; method=lora; }
  local workdir=runs/squad/${name}_s${SEED}
  [ -f "$workdir/results.json" ] && return 0
  echo "$(date +%T) start $workdir" >&2
  .venv/bin/python -m $entry --config=configs/squad.py:model=minilm --config.method=$method \
    --config.data.dir=../shared/data/squad --config.data.train_subset=$SUBSET --config.num_epochs=$EPOCHS --config.data.segment_ids=False \
    --config.seed=$SEED --config.workdir=$workdir --config.progress=False > $workdir.log 2>&1 \
    || { echo "$(date +%T) FAILED $workdir (see $workdir.log)" >&2; return 1; }
  echo "$(date +%T) done  $workdir" >&2
}
export -f run_one
printf '%s\n' $methods | xargs -P 2 -I{} bash -c 'run_one {}'
