#!/usr/bin/env bash
# Runs the docs/RESULTS.md sweep on the embedded MiniLM (rank 8, r_hat 4),
# over seeds, on the tasks given. $METHODS names the methods: any of
# rmlora_jax.methods (full_ft lora r_lora gm_lora rm_lora adalora sora lora2),
# sora_released (SoRA with its released code's gates and threshold), and the
# PEFT anchors peft_lora and peft_adalora (PEFT's AdaLoRA at our AdaLoRA's
# budget and schedule). Default: the anchor and the four RM-LoRA variants.
# SST-2 trains on a fixed 2,000-example subset ($SUBSET); every other task on
# its full training set.
# $CONDITIONS names how the LoRA family and the PEFT anchor run: "default"
# (our defaults), "authors" (:preset=authors, the RM-LoRA authors' training
# loop) and "authors_frozen_head" (that preset with rm.emulate_frozen_head;
# the PEFT anchor skips it). Default: "default".
# $EXTRA adds flags to every run and $TAG (e.g. _w0.1) to its folder name, for
# a sweep of one setting beside the table's runs.
# Finished runs (with a results.json) are skipped and an interrupted one
# resumes from its checkpoint, so the script can simply be started again; a
# run that another sweep is running (its lock is held) is skipped too.
#
#   bash scripts/results_table.sh "sst2 cola" "0 1 2"
#   JOBS=2 bash scripts/results_table.sh "cola rte" "0 1 2"   # two runs at a time
#   METHODS="full_ft adalora peft_adalora sora sora_released lora2" bash scripts/results_table.sh sst2
#   CONDITIONS="default authors authors_frozen_head" bash scripts/results_table.sh "sst2 cola"
#   METHODS="adalora peft_adalora" TAG=_w0.1 EXTRA="--config.adalora.ortho_weight=0.1" bash scripts/results_table.sh sst2 0
#
# With JOBS > 1 each run is limited to one CPU thread: on a small CPU machine
# two single-threaded runs side by side finish sooner than two in a row
# (about 1.2x on 2 cores with MiniLM), since XLA spreads these small matrices
# poorly over cores. Logs go to runs/table/<run>.log; the tables (final and
# best evaluations) are printed and runs/table/scores.png drawn at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
tasks=${1:-sst2}
seeds=${2:-"0 1 2"}
export SUBSET=${SUBSET:-2000} TAG=${TAG:-} EXTRA=${EXTRA:-}
jobs=${JOBS:-1}
methods=${METHODS:-"peft_lora lora r_lora gm_lora rm_lora"}
conditions=${CONDITIONS:-default}
mkdir -p runs/table

# The folder of one run: runs/table/<task>_<method>[@<preset>[+frozen_head]][$TAG]_s<seed>.
workdir_of() {
  local task=$1 method=$2 seed=$3 condition=$4 suffix=""
  case "$condition" in
    authors) suffix=@authors ;;
    authors_frozen_head) suffix=@authors+frozen_head ;;
  esac
  echo "runs/table/${task}_${method}${suffix}${TAG:-}_s${seed}"
}
export -f workdir_of

run_one() {
  local task=$1 method=$2 seed=$3 condition=$4
  local arg=model=minilm extra=()
  case "$condition" in
    default) ;;
    authors) arg+=,preset=authors ;;
    authors_frozen_head) arg+=,preset=authors
                         extra=(--config.rm.emulate_frozen_head=True)
                         case "$method" in peft_*) return 0 ;; esac ;;
    *) echo "unknown condition $condition" >&2; return 1 ;;
  esac
  local workdir
  workdir=$(workdir_of "$task" "$method" "$seed" "$condition")
  [ -f "$workdir/results.json" ] && return 0
  exec 9>"$workdir.lock"
  flock -n 9 || { echo "$(date +%T) skip  $workdir (another sweep is running it)" >&2; return 0; }
  local args=(--config=configs/${task}.py:$arg --config.data.dir=../shared/data/glue
              --config.seed=$seed --config.workdir=$workdir --config.progress=False "${extra[@]}" ${EXTRA:-})
  [ "$task" = sst2 ] && args+=(--config.data.train_subset=$SUBSET)
  echo "$(date +%T) start $workdir" >&2
  case "$method" in
    peft_*) .venv/bin/python -m experiments.peft_glue "${args[@]}" --config.method=${method#peft_} ;;
    sora_released) .venv/bin/python -m experiments.glue "${args[@]}" --config.method=sora \
                     --config.sora.variant=released ;;
    *) .venv/bin/python -m experiments.glue "${args[@]}" --config.method=$method ;;
  esac > "$workdir.log" 2>&1 || { echo "$(date +%T) FAILED $workdir (see $workdir.log)" >&2; return 1; }
  echo "$(date +%T) done  $workdir" >&2
}
export -f run_one

if [ "$jobs" -gt 1 ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
  export OMP_NUM_THREADS=1
fi
queue=$(mktemp)
for task in $tasks; do
  for seed in $seeds; do
    for condition in $conditions; do
      for method in $methods; do
        echo "$task $method $seed $condition"
      done
    done
  done
done > "$queue"
# xargs and its runs get a process group of their own, so that stopping this
# script (Ctrl-C, kill) stops them too instead of leaving them running.
setsid xargs -a "$queue" -P "$jobs" -L 1 bash -c 'run_one "$@"' _ &
workers=$!
trap 'kill -- -"$workers" 2>/dev/null; rm -f "$queue"; exit 130' INT TERM
status=0
wait "$workers" || status=$?
# The tables of this sweep's runs (other sweeps' runs in runs/table, a TAG's
# setting sweep say, would repeat method and seed).
finished=()
while read -r task method seed condition; do
  file=$(workdir_of "$task" "$method" "$seed" "$condition")/results.json
  [ -f "$file" ] && finished+=("$file")
done < "$queue"
rm -f "$queue"
if [ "${#finished[@]}" -gt 0 ]; then
  .venv/bin/python -m experiments.collect_results "${finished[@]}" --plot=runs/table/scores.png
  echo
  .venv/bin/python -m experiments.collect_results "${finished[@]}" --score=best
fi
exit "$status"
