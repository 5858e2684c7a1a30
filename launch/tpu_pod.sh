#!/usr/bin/env bash
# m2net_jax on a Cloud TPU VM pod slice: create (optionally) the slice, install the project on
# every worker, and run the same command on all of them. JAX's distributed runtime detects the
# slice's workers itself (main.py calls jax.distributed.initialize() with --multiprocess).
#
# Usage:
#   launch/tpu_pod.sh create                      # create the slice (once)
#   launch/tpu_pod.sh setup                       # copy this checkout to every worker, install
#   launch/tpu_pod.sh run --config=m2net_jax/configs/r47.py --workdir=gs://BUCKET/runs/r47_l420
#   launch/tpu_pod.sh delete
#
# Knobs (environment):
#   TPU_NAME (m2net), ZONE (us-central2-b), ACCELERATOR (v4-64), RUNTIME (tpu-ubuntu2204-base),
#   PROJECT (gcloud's default), DATA_DIR (where Landmark-420/732 are built: a gs:// bucket that
#   every worker reads, or a local path present on every worker).
# The workdir should be a gs:// bucket (Orbax writes checkpoints from all workers). Build the
# dataset once (python -m m2net_jax.data.build ... --data_dir=gs://BUCKET/tfds) before `run`.
# Preemption: the TPU runtime's notice reaches every worker; the job saves at an agreed step
# (jax's preemption sync point) and exits; `run` again to resume.
set -euo pipefail

TPU_NAME=${TPU_NAME:-m2net}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-64}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
DATA_DIR=${DATA_DIR:-}
project_flag=()
[ -n "${PROJECT:-}" ] && project_flag=(--project="$PROJECT")

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" \
    --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  setup)
    gcloud compute tpus tpu-vm scp --recurse "$(git rev-parse --show-toplevel)" \
      "$TPU_NAME":~/m2net_jax --zone="$ZONE" "${project_flag[@]}" --worker=all
    on_all_workers "cd ~/m2net_jax && pip install -U pip && pip install -c constraints.txt -e . 'jax[tpu]'"
    ;;
  run)
    shift
    data_flag=""
    [ -n "$DATA_DIR" ] && data_flag="--config.data.data_dir=$DATA_DIR"
    # printf %q keeps the flags intact through ssh's shell.
    on_all_workers "cd ~/m2net_jax && python -m m2net_jax.main --multiprocess $data_flag $(printf '%q ' "$@")"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${project_flag[@]}" --quiet
    ;;
  *)
    sed -n '2,21p' "$0"
    exit 2
    ;;
esac
