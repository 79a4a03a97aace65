#!/usr/bin/env bash
# Train on every accelerator of this machine (the batch is split over all
# local devices by the train step's mesh).
#   launch/local.sh configs/mitoem_r.py runs/mitoem_r [--config.train.steps=...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [more stt_jax.main flags]" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m stt_jax.main --config="$config" --workdir="$workdir" "$@"
