#!/usr/bin/env bash
# Issue 8's first call of a 15-minute GPU lease (docs/gpu_runbook.md), ~9 min:
#   1. the deformable conv alone at the level-1 chunk, its gradient's
#      scatter-add in each order (bench/deform_impl.py), and the fastest
#      float32 order picked;
#   2. the STT-UNET train row at the paper's setup against both PyTorch
#      peers, unchunked (its planned scratch on an H200: 31.6 GiB, no
#      recompute), with that order;
#   3. the same row of ours alone with chunks 4 (session 34's setting: 430.9 ms).
# Usage, on the device after the runbook's <prefix>: bench/lease_issue8.sh $OUT
# Everything lands in OUT as two files whatever the count of results: call.log
# and results.tgz (the bench/results files this call wrote; the lease returns
# at most 8 files). CASES / DEFORM_ARGS change the shapes for a trial on a CPU.
set -u
out=${1:?usage: bench/lease_issue8.sh OUT_DIR}
cases=${CASES:-paper}
mkdir -p "$out"
stamp=$(mktemp)
pack() {
  find bench/results -type f -newer "$stamp" | tar czf "$out/results.tgz" -T -
  rm -f "$stamp"
}
trap pack EXIT
log() { grep --line-buffered -v cuda_timer | tee -a "$out/call.log"; }

# shellcheck disable=SC2086  # DEFORM_ARGS is a list of flags
timeout 100 python3 bench/deform_impl.py ${DEFORM_ARGS:-} \
  --variants=float32,float32+tap_major,float32+sorted,input 2>&1 | log
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
timeout 140 "${row[@]}" --attention-chunks=4 --modes= 2>&1 | log
