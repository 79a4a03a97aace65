#!/bin/bash
# VNC III, the paper's Table 3 rows side by side on ONE GPU: baseline, stt and
# stt_adv train concurrently (memory is not preallocated, so they share it);
# each stops at STEPS or after TRAIN_LIMIT_S seconds (SIGTERM -> checkpoint of
# that step -> --mode=evaluate). The baseline then segments stack2.
#
#   bench/vnc3_runs.sh STEPS TRAIN_LIMIT_S [--config.x=y ...]
#   PRESETS="baseline stt" OUT=runs/vnc3_logs bench/vnc3_runs.sh 1200 400
#
# Data: $STT_JAX_DATA/vnc3 (default ../shared/data/vnc3). Runs in $RUNS
# (default /tmp/runs); logs, TensorBoard events, eval tables, stack2's
# segment.json and a preview in $OUT (default /tmp/out).
set -u; PY=${PY:-python3}
STEPS=$1; LIMIT=$2; shift 2; EXTRA="$*"
export STT_JAX_DATA=${STT_JAX_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
W=${RUNS:-/tmp/runs}; mkdir -p $W; OUT=${OUT:-/tmp/out}; mkdir -p $OUT
t0=$(date +%s)
common="--config.train.steps=$STEPS --config.train.eval_every=0 --config.train.checkpoint_every=500 --quiet $EXTRA"
for p in ${PRESETS:-baseline stt stt_adv}; do
  (
    log=$OUT/$p.log
    timeout -s TERM $LIMIT $PY -m stt_jax.main --config=configs/vnc3.py:$p --workdir=$W/$p $common >$log 2>&1
    echo "[driver] train rc=$? at $(( $(date +%s) - t0 )) s" >>$log
    if [ ! -f $W/$p/eval.json ]; then
      $PY -m stt_jax.main --config=configs/vnc3.py:$p --workdir=$W/$p $common --mode=evaluate >>$log 2>&1
      echo "[driver] evaluate rc=$? at $(( $(date +%s) - t0 )) s" >>$log
    fi
    echo "[driver] eval.json:" >>$log; cat $W/$p/eval.json >>$log
    cp "$(ls $W/$p/tensorboard/events* | head -1)" $OUT/tb-$p.events
    if [ $p = baseline ]; then
      $PY -m stt_jax.main --config=configs/vnc3.py:$p --workdir=$W/$p $common --mode=segment \
        --input=$STT_JAX_DATA/vnc3/stack2/raw --output=$W/stack2 >>$log 2>&1
      echo "[driver] segment rc=$? at $(( $(date +%s) - t0 )) s" >>$log
      cp $W/stack2/segment.json $OUT/stack2-segment.json
      cp "$(ls $W/stack2/previews/*.png | head -1)" $OUT/stack2-preview.png
    fi
  ) &
done
wait
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null | tail -1
echo "[driver] done at $(( $(date +%s) - t0 )) s"
