#!/usr/bin/env bash
# Build and run stt_jax in a container with a GPU JAX: CUDA (NVIDIA) or ROCm
# (AMD, e.g. the MI250X of the paper). The image's entry point is
# `python -m stt_jax.main`; this script adds the device flags each needs.
#   launch/container.sh [--dry-run] cuda|rocm CONFIG WORKDIR [more flags]
#   launch/container.sh rocm configs/mitoem_r.py runs/r
# The checkout's runs/ and data/ folders are mounted at the same paths inside
# (put volumes under data/ or add mounts with EXTRA_DOCKER_ARGS).
set -euo pipefail
dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
if [[ $# -lt 3 || ! $1 =~ ^(cuda|rocm)$ ]]; then
  echo "usage: $0 [--dry-run] cuda|rocm CONFIG WORKDIR [more stt_jax.main flags]" >&2
  exit 2
fi
kind=$1; config=$2; workdir=$3; shift 3
cd "$(dirname "$0")/.."
image=stt_jax:$kind
case $kind in
  cuda) devices=(--gpus all) ;;
  rocm) devices=(--device=/dev/kfd --device=/dev/dri --group-add video
                 --security-opt seccomp=unconfined) ;;
esac
mkdir_cmd="mkdir -p runs data"
build=(docker build -f "launch/docker/$kind.Dockerfile" -t "$image" .)
run=(docker run --rm --shm-size=16g "${devices[@]}" -v "$PWD/runs:/stt_jax/runs"
     -v "$PWD/data:/stt_jax/data" ${EXTRA_DOCKER_ARGS:-} "$image"
     --config="$config" --workdir="$workdir" "$@")
if (( dry_run )); then
  echo "$mkdir_cmd"; echo "${build[*]}"; echo "${run[*]}"
  exit 0
fi
$mkdir_cmd
"${build[@]}"
"${run[@]}"
