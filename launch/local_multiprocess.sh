#!/usr/bin/env bash
# N processes of m2net_jax on this machine, each with its own CPU devices: the multi-host code
# path (jax.distributed, per-process data shards, cross-process collectives over gloo, Orbax
# multi-process checkpoints) without a cluster. For testing; a real cluster uses tpu_pod.sh or
# slurm_gpu.sbatch.
#
# Usage:
#   launch/local_multiprocess.sh N [flags of python -m m2net_jax.main ...]
#   launch/local_multiprocess.sh 2 --config=m2net_jax/configs/quickstart.py --workdir=/tmp/m2net_2proc
#
# Knobs (environment):
#   DEVICES_PER_PROCESS  CPU devices each process sees (default 2)
#   PORT                 coordinator port on localhost (default 12355)
#   PYTHON               interpreter (default python)
# Process 0's output comes through as is; the others' lines are prefixed with [process i].
set -euo pipefail

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_PROCESSES [m2net_jax.main flags...]" >&2
  exit 2
fi
num_processes=$1
shift
port=${PORT:-12355}
python=${PYTHON:-python}

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}"

pids=()
for ((i = 0; i < num_processes; i++)); do
  args=(-m m2net_jax.main --coordinator_address="localhost:${port}"
        --num_processes="${num_processes}" --process_id="${i}" "$@")
  if [ "$i" -eq 0 ]; then
    "$python" "${args[@]}" &
  else
    "$python" "${args[@]}" > >(sed "s/^/[process $i] /") 2>&1 &
  fi
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
