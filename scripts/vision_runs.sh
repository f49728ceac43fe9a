#!/usr/bin/env bash
# The offline vision experiment of docs/VISION.md, end to end, single-threaded
# runs ($JOBS at a time): pre-trains the ViT stand-in on five CIFAR-10 classes
# (runs/vit_pretrain), adapts its last layer on the other five with each
# method, rank and seed (runs/vision/transfer_<method>_r<R>_s<seed>), trains the
# whole classifier as a linear probe per seed (runs/vision/probe_full_ft_s<seed>),
# then writes the Table 4 and Figure 1 analogues into docs/VISION.md.
# Finished runs are skipped.
#
#   bash scripts/vision_runs.sh                      # ranks 2 3 4 5, seeds 0 1 2
#   RANKS="4" SEEDS="0" bash scripts/vision_runs.sh  # a quick look
#
# With five classes dW (5 x 192) has rank at most 5: ranks above 5 are refused.
set -euo pipefail
cd "$(dirname "$0")/.."
export RANKS=${RANKS:-"2 3 4 5"} SEEDS=${SEEDS:-"0 1 2"} METHODS=${METHODS:-"lora gm_lora r_lora rm_lora"}
export DATA=${DATA:-../shared/data/cifar10} ROOT=${ROOT:-runs/vision} PRETRAIN=${PRETRAIN:-runs/vit_pretrain}
JOBS=${JOBS:-2}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
export OMP_NUM_THREADS=1
mkdir -p "$ROOT"
run() {  # workdir, then the experiment's flags
  local workdir=$1; shift
  [ -f "$workdir/results.json" ] && return 0
  echo "$(date +%T) start $workdir" >&2
  .venv/bin/python -m experiments.vision "$@" --config.data.dir="$DATA" --config.workdir="$workdir" \
    --config.progress=False > "$workdir.log" 2>&1 || { echo "FAILED $workdir (see $workdir.log)" >&2; return 1; }
}
transfer() {  # method rank seed
  local method=$1 rank=$2 seed=$3 name
  local flags=(--config="configs/cifar10_transfer.py:method=$method" --config.model.name_or_path="$PRETRAIN/model"
               --config.seed="$seed")
  if [ "$method" = full_ft ]; then
    name=probe_full_ft_s$seed
  else
    name=transfer_${method}_r${rank}_s${seed}
    flags+=(--config.lora.rank="$rank" --config.rm.num_directions=$(( (rank + 1) / 2 )))
  fi
  run "$ROOT/$name" "${flags[@]}"
}
export -f run transfer
run "$PRETRAIN" --config=configs/vit_pretrain.py
# One run first fills the feature cache that every other run reads.
first=$(echo $METHODS | cut -d' ' -f1)
transfer "$first" "$(echo $RANKS | cut -d' ' -f1)" "$(echo $SEEDS | cut -d' ' -f1)"
for seed in $SEEDS; do
  echo "full_ft 0 $seed"
  for rank in $RANKS; do for method in $METHODS; do echo "$method $rank $seed"; done; done
done | xargs -P "$JOBS" -L 1 bash -c 'transfer "$0" "$1" "$2"'
.venv/bin/python -m experiments.vision_report --runs="$ROOT" --pretrain="$PRETRAIN" --doc=docs/VISION.md \
  --figure=docs/vision_figure1.png
