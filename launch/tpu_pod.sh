#!/usr/bin/env bash
# A Cloud TPU VM pod slice: the same command on every worker, each worker one
# JAX process; --distributed=on makes jax.distributed.initialize() find the
# pod's other workers by itself (no coordinator flags on TPU VMs).
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [more flags]
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/mitoem_r.py /mnt/shared/runs/r
# Steps: copy this checkout to every worker, install the pinned requirements
# with the TPU jaxlib (libtpu), then run. WORKDIR must be a file system every
# worker sees (e.g. a Filestore/NFS or gcsfuse mount).
set -euo pipefail
dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
if [[ $# -lt 4 ]]; then
  echo "usage: $0 [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [more stt_jax.main flags]" >&2
  exit 2
fi
tpu=$1; zone=$2; config=$3; workdir=$4; shift 4
cd "$(dirname "$0")/.."
jax_version=$(sed -n 's/^jax==//p' requirements.txt)
setup="cd ~/stt_jax && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt \
&& .venv/bin/pip install -q 'jax[tpu]==$jax_version'"
run="cd ~/stt_jax && .venv/bin/python -u -m stt_jax.main --config=$config --workdir=$workdir \
--distributed=on --config.backend.platform=tpu $*"
steps=(
  "gcloud compute tpus tpu-vm scp --recurse --zone=$zone --worker=all . $tpu:~/stt_jax"
  "gcloud compute tpus tpu-vm ssh $tpu --zone=$zone --worker=all --command=\"$setup\""
  "gcloud compute tpus tpu-vm ssh $tpu --zone=$zone --worker=all --command=\"$run\""
)
for step in "${steps[@]}"; do
  if (( dry_run )); then echo "$step"; else eval "$step"; fi
done
