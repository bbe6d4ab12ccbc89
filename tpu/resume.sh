#!/usr/bin/env bash
# Keep a run going through preemptions: launch; when the slice was preempted (or deleted),
# recreate it, reinstall and launch again. The run resumes from OUT_DIR/train_state (so OUT_DIR
# must be on the bucket mount, not a worker's disk). Same arguments as launch.sh.
#   PROJECT=my-project BUCKET=my-bucket SPOT=1 tpu/resume.sh paper/qwen3.5-9b/k256_32x /mnt/srp/runs/q9b
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu/config.sh
source "${HERE}/config.sh"
MAX_ATTEMPTS="${MAX_ATTEMPTS:-20}"

for attempt in $(seq 1 "${MAX_ATTEMPTS}"); do
  if "${HERE}/launch.sh" "$@"; then
    echo "[resume] finished (attempt ${attempt})"
    exit 0
  fi
  state="$(tpu_state)"
  echo "[resume] attempt ${attempt} stopped; ${TPU_NAME} is ${state}"
  if [[ "${state}" == "READY" ]]; then
    echo "[resume] the slice is healthy, so the run itself failed: see ~/srp-train.log on worker 0" >&2
    exit 1
  fi
  "${HERE}/delete.sh" || true
  "${HERE}/create.sh"
  "${HERE}/install.sh"
done
echo "[resume] giving up after ${MAX_ATTEMPTS} attempts" >&2
exit 1
