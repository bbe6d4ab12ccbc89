#!/usr/bin/env bash
# Start the same `srp-jax train` on every worker (jax.distributed finds its peers on Cloud TPU)
# and wait for it. Extra arguments go to `srp-jax train`.
#   PROJECT=my-project BUCKET=my-bucket tpu/launch.sh paper/qwen3.5-9b/k256_32x /mnt/srp/runs/q9b \
#       --set mesh.data=1 --set mesh.model=-1
# The payload named by the config (${SRP_DATA_ROOT}/...) must be readable on every worker:
# SRP_DATA_ROOT defaults to ${MOUNT}/data. Rerunning the same command resumes the run.
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu/config.sh
source "${HERE}/config.sh"

if [[ $# -lt 2 ]]; then
  echo "usage: tpu/launch.sh CONFIG OUT_DIR [srp-jax train options...]" >&2
  exit 2
fi
CONFIG="$1"
OUT_DIR="$2"
shift 2
EXTRA=""
for arg in "$@"; do
  EXTRA+=" $(printf '%q' "${arg}")"
done
DATA_ROOT="${SRP_DATA_ROOT:-${MOUNT}/data}"

on_all_workers "SRP_DATA_ROOT=$(printf '%q' "${DATA_ROOT}") ${VENV}/bin/python -m srp_jax.cli.main train \
  --config $(printf '%q' "${CONFIG}") --out-dir $(printf '%q' "${OUT_DIR}")${EXTRA} 2>&1 | tee -a ~/srp-train.log; \
  exit \${PIPESTATUS[0]}"
