#!/usr/bin/env bash
# Install srp-jax (this checkout, as a wheel) and jax[tpu] on every worker, in a Python 3.11
# virtualenv; mount BUCKET at MOUNT on every worker when BUCKET is set.
#   PROJECT=my-project BUCKET=my-bucket tpu/install.sh
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu/config.sh
source "${HERE}/config.sh"
REPO="$(cd "${HERE}/.." && pwd)"

# 1. a wheel of this checkout, copied to every worker
rm -rf "${REPO}/dist"
python3 -m pip wheel --no-deps "${REPO}" -w "${REPO}/dist"
WHEEL="$(cd "${REPO}/dist" && ls srp_jax-*.whl)"
"${GCLOUD_TPU[@]}" scp "${REPO}/dist/${WHEEL}" "${TPU_NAME}:~/" "${WHERE[@]}" --worker=all

# 2. Python 3.11 (the TPU images ship 3.10), a virtualenv, jax[tpu] and the wheel
on_all_workers "set -e
  sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv
  python3.11 -m venv ${VENV}
  ${VENV}/bin/python -m pip install -q --upgrade pip
  ${VENV}/bin/python -m pip install -q '${JAX_SPEC}' ~/${WHEEL}
  ${VENV}/bin/python -c 'import jax, srp_jax; print(jax.process_index(), jax.local_device_count(), srp_jax.__version__)'"

# 3. the shared run directory: Cloud Storage FUSE on every worker (multi-host runs need it)
if [[ -n "${BUCKET}" ]]; then
  on_all_workers "set -e
    if ! command -v gcsfuse >/dev/null; then
      echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
      sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
    fi
    sudo mkdir -p ${MOUNT} && sudo chown \$(id -u):\$(id -g) ${MOUNT}
    mountpoint -q ${MOUNT} || gcsfuse --implicit-dirs --rename-dir-limit=200000 ${BUCKET} ${MOUNT}"
fi
echo "[install] srp-jax ${WHEEL} on every worker of ${TPU_NAME}"
