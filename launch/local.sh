#!/usr/bin/env bash
# One process on this machine, every local accelerator in it: the batch is
# split over all local devices by the train step's mesh. The usual way to use
# a multi-GPU workstation (no coordinator, no NCCL setup).
#   launch/local.sh [--dry-run] CONFIG WORKDIR [more stt_jax.main flags]
#   launch/local.sh configs/mitoem_r.py runs/mitoem_r --config.train.steps=1000
# A WORKDIR that already holds a run is continued (--resume is added).
set -euo pipefail
dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
if [[ $# -lt 2 ]]; then
  echo "usage: $0 [--dry-run] CONFIG WORKDIR [more stt_jax.main flags]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# shellcheck source=launch/common.sh
source launch/common.sh
read -ra resume <<< "$(resume_flag "$workdir" "$@")"
cmd=("$PY" -m stt_jax.main --config="$config" --workdir="$workdir" "${resume[@]}" "$@")
if (( dry_run )); then
  echo "process 0 of 1: ${cmd[*]}"
  exit 0
fi
exec "${cmd[@]}"
