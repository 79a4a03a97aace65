#!/usr/bin/env bash
# Issue 8's first call of a 15-minute GPU lease (docs/gpu_runbook.md), ~9 min:
#   1. the deformable conv alone at the level-1 chunk, its gradient's
#      scatter-add in each order (bench/deform_impl.py), and the fastest
#      float32 order picked;
#   2. the STT-UNET train row at the paper's setup against both PyTorch
#      peers, unchunked (its planned scratch on an H200: 31.6 GiB, and no
#      recompute), with that order;
#   3. the same row of ours alone with XLA's 3D convolutions channels-last
#      (--xla_gpu_force_conv_nhwc; XLA lays them out channels-first, the
#      peer runs channels-last).
# Usage, on the device after the runbook's <prefix>: bench/lease_issue8.sh $OUT
# Everything lands in OUT as two files whatever the count of results: call.log
# and results.tgz (each step's results files, named <step>-<file>: steps 2
# and 3 write the same file name; the lease returns at most 8 files).
# CASES / DEFORM_ARGS change the shapes for a trial on a CPU.
set -u
out=${1:?usage: bench/lease_issue8.sh OUT_DIR}
cases=${CASES:-paper}
mkdir -p "$out"
stage=$(mktemp -d)
stamp="$stage/.since"
touch "$stamp"
keep() {  # keep STEP: the results files written since the last keep, as STEP-<name>
  local f
  for f in $(find bench/results -type f -newer "$stamp"); do
    cp "$f" "$stage/$1-$(basename "$f")"
  done
  touch "$stamp"
}
trap 'tar czf "$out/results.tgz" -C "$stage" --exclude=.since .; rm -rf "$stage"' EXIT
log() { grep --line-buffered -v cuda_timer | tee -a "$out/call.log"; }

# shellcheck disable=SC2086  # DEFORM_ARGS is a list of flags
timeout 100 python3 bench/deform_impl.py ${DEFORM_ARGS:-} \
  --variants=float32,float32+tap_major,float32+sorted,input 2>&1 | log
keep 1
order=$(python3 - <<'EOF' 2>/dev/null || echo scatter
import glob, json, os
path = max(glob.glob("bench/results/deform_impl-*.json"), key=os.path.getmtime)
rows = json.load(open(path))
times = {order: rows.get("float32" + ("" if order == "scatter" else "+" + order), {})
         .get("step_s", float("inf")) for order in ("scatter", "sorted", "tap_major")}
print(min(times, key=times.get))
EOF
)
echo "deformable gradient order: $order" | log
row=(python3 bench/train_throughput.py --models=stt "--cases=$cases" --dtypes=bfloat16
     --attention-impl=pallas --check=skip --repeats=4 --flops=skip
     "--override=model.attention.deform_gradient=$order")
timeout 320 "${row[@]}" --attention-chunks=1 2>&1 | log
keep 2
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_force_conv_nhwc=true" \
  timeout 140 "${row[@]}" --attention-chunks=1 --modes= 2>&1 | log
keep 3
