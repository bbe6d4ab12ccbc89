#!/usr/bin/env bash
# Delete the TPU VM / slice (and its queued resource, for SPOT=1). The bucket is kept.
#   PROJECT=my-project tpu/delete.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu/config.sh
source "${HERE}/config.sh"

if [[ "${SPOT}" == "1" ]]; then
  gcloud compute tpus queued-resources delete "${TPU_NAME}-qr" "${WHERE[@]}" --force --quiet
else
  "${GCLOUD_TPU[@]}" delete "${TPU_NAME}" "${WHERE[@]}" --quiet
fi
