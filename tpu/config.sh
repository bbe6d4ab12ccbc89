# shellcheck shell=bash
# Settings shared by the tpu/ scripts. Every value can be overridden from the environment:
#   PROJECT=my-project ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 BUCKET=my-bucket tpu/create.sh
set -euo pipefail

: "${PROJECT:?set PROJECT to your Google Cloud project id}"
ZONE="${ZONE:-us-central2-b}"                 # a zone that offers ACCELERATOR_TYPE
TPU_NAME="${TPU_NAME:-srp-jax}"               # the TPU VM / slice name
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"  # v4-8, v4-32, v5litepod-8, v5litepod-32, v6e-8, ...
SPOT="${SPOT:-0}"                             # 1: a Spot slice through a queued resource (preemptible)
BUCKET="${BUCKET:-}"                          # a Cloud Storage bucket (no gs://) mounted on every worker
MOUNT="${MOUNT:-/mnt/srp}"                    # where BUCKET is mounted (run directories and payloads)
VENV="${VENV:-\$HOME/srp-venv}"               # the virtualenv on each worker (expanded there)
JAX_SPEC="${JAX_SPEC:-jax[tpu]>=0.10.2,<0.11}"  # matches srp-jax's jax pin

# The TPU software version for JAX on each TPU generation (Cloud TPU "TPU software versions").
if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  case "${ACCELERATOR_TYPE}" in
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    *) RUNTIME_VERSION=tpu-ubuntu2204-base ;;  # v4 and earlier
  esac
fi

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
WHERE=(--zone="${ZONE}" --project="${PROJECT}")

# Run a shell command on every worker of the slice (the same command everywhere).
on_all_workers() {
  "${GCLOUD_TPU[@]}" ssh "${TPU_NAME}" "${WHERE[@]}" --worker=all --command="$1"
}

# The state of the TPU VM (READY, PREEMPTED, ...), or NOT_FOUND.
tpu_state() {
  "${GCLOUD_TPU[@]}" describe "${TPU_NAME}" "${WHERE[@]}" --format='value(state)' 2>/dev/null || echo NOT_FOUND
}
