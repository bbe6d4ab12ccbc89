#!/usr/bin/env bash
# Create the TPU VM / pod slice and wait until it is READY.
#   PROJECT=my-project ACCELERATOR_TYPE=v4-8 tpu/create.sh
#   PROJECT=my-project ACCELERATOR_TYPE=v5litepod-32 ZONE=us-west4-a SPOT=1 tpu/create.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu/config.sh
source "${HERE}/config.sh"

if [[ "${SPOT}" == "1" ]]; then
  # A queued resource waits for capacity instead of failing; Spot slices can be preempted.
  gcloud compute tpus queued-resources create "${TPU_NAME}-qr" "${WHERE[@]}" \
    --node-id="${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" \
    --runtime-version="${RUNTIME_VERSION}" --spot
  until [[ "$(gcloud compute tpus queued-resources describe "${TPU_NAME}-qr" "${WHERE[@]}" \
                --format='value(state.state)')" == "ACTIVE" ]]; do
    echo "[create] waiting for ${TPU_NAME}-qr to become ACTIVE ..."
    sleep 60
  done
else
  "${GCLOUD_TPU[@]}" create "${TPU_NAME}" "${WHERE[@]}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}"
fi
until [[ "$(tpu_state)" == "READY" ]]; do
  echo "[create] waiting for ${TPU_NAME} to be READY (now $(tpu_state)) ..."
  sleep 30
done
echo "[create] ${TPU_NAME} (${ACCELERATOR_TYPE}, ${RUNTIME_VERSION}) is READY in ${ZONE}"
