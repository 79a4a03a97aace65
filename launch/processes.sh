#!/usr/bin/env bash
# N JAX processes on this machine, joined by jax.distributed (the code path of
# a multi-node run, on one host): process 0 is the coordinator on a free
# local port. On a CPU each process gets DEVICES_PER_PROCESS host devices; on
# a GPU machine set GPUS_PER_PROCESS=g to give process i GPUs [i*g, (i+1)*g).
#   launch/processes.sh [--dry-run] N CONFIG WORKDIR [more stt_jax.main flags]
#   launch/processes.sh 2 configs/demo.py runs/demo_2proc      # CPU, 2 x 1 device
# Process 0 writes to the terminal, the others' lines are prefixed with their
# index; Ctrl-C or SIGTERM is passed
# to every process (each saves a checkpoint); if one process fails the others
# are stopped. A WORKDIR that already holds a run is continued (--resume).
set -euo pipefail
dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
if [[ $# -lt 3 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [--dry-run] N CONFIG WORKDIR [more stt_jax.main flags]" >&2
  exit 2
fi
n=$1; config=$2; workdir=$3; shift 3
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
port=${PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
# shellcheck source=launch/common.sh
source launch/common.sh
read -ra resume <<< "$(resume_flag "$workdir" "$@")"

process_env() {  # sets penv: the environment of process $1, as NAME=value words
  local i=$1
  if [[ -n ${GPUS_PER_PROCESS:-} ]]; then
    local g=$GPUS_PER_PROCESS ids
    ids=$(seq -s, $((i * g)) $((i * g + g - 1)))
    penv=("CUDA_VISIBLE_DEVICES=$ids" "HIP_VISIBLE_DEVICES=$ids")
  else
    # the device count is ours; any other XLA flag the caller exported stays
    local others
    others=$(sed -E 's/(^| )--xla_force_host_platform_device_count=[^ ]*//g; s/^ +//' \
             <<< "${XLA_FLAGS:-}")
    penv=("JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}"
          "XLA_FLAGS=--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}${others:+ $others}")
  fi
}

process_args() {  # sets args: the command line of process $1 (the rest: extra flags)
  local i=$1
  shift
  args=("$PY" -u -m stt_jax.main --config="$config" --workdir="$workdir" "${resume[@]}" "$@"
        --coordinator_address="localhost:$port" --num_processes="$n" --process_id="$i")
}

if (( dry_run )); then
  for ((i = 0; i < n; i++)); do
    process_args "$i" "$@"
    process_env "$i"
    shown=""
    for word in "${penv[@]}"; do  # as a shell would take it back
      [[ $word == *" "* ]] && word="${word%%=*}='${word#*=}'"
      shown+="$word "
    done
    echo "process $i of $n: $shown${args[*]}"
  done
  exit 0
fi

pids=()
stop_all() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap 'stop_all' INT TERM
for ((i = 0; i < n; i++)); do
  process_args "$i" "$@"
  process_env "$i"
  if (( i == 0 )); then  # straight to the terminal: its progress bar stays one line
    env "${penv[@]}" "${args[@]}" &
  else
    env "${penv[@]}" "${args[@]}" > >(sed -u "s/^/[process $i] /") 2>&1 &
  fi
  pids+=($!)
done
status=0
running=("${pids[@]}")
while (( ${#running[@]} )); do
  rc=0
  wait -n -p finished "${running[@]}" || rc=$?
  running=("${running[@]/$finished}")
  read -ra running <<< "${running[*]}"
  if (( rc != 0 && status == 0 )); then
    status=$rc
    echo "process exited with $rc; stopping the others" >&2
    stop_all
  fi
done
exit "$status"
