#!/usr/bin/env bash
# Create the TPU VM or pod slice TPU_NAME (see tpu/config.sh for the settings).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: TPU_NAME=NAME ZONE=ZONE [ACCELERATOR_TYPE=v4-8] [RUNTIME_VERSION=...] [PROJECT=...]
       [SPOT=1 | PREEMPTIBLE=1] [CREATE_FLAGS='--reserved ...'] [DRY_RUN=1] tpu/create.sh

Creates a Cloud TPU VM (v4-8, v5litepod-8) or pod slice (v4-64, v5litepod-64, ...):
  gcloud compute tpus tpu-vm create NAME --zone ZONE --accelerator-type TYPE --version VERSION
SPOT=1 adds --spot, PREEMPTIBLE=1 --preemptible; CREATE_FLAGS are added as they are (split at
spaces), e.g. --reserved, --network NET --subnetwork SUBNET, --data-disk source=DISK,mode=read-only.
USAGE
}

case ${BASH_SOURCE[0]} in */*) here="${BASH_SOURCE[0]%/*}" ;; *) here=. ;; esac
# shellcheck source=SCRIPTDIR/config.sh
source "$here/config.sh"

no_arguments "$@"
require TPU_NAME ZONE ACCELERATOR_TYPE
[[ -n $RUNTIME_VERSION ]] ||
  usage_error "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set it" \
    "(gcloud compute tpus tpu-vm versions list --zone $ZONE)"

flags=(--accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION")
if [[ ${SPOT:-0} == 1 ]]; then
  flags+=(--spot)
fi
if [[ ${PREEMPTIBLE:-0} == 1 ]]; then
  flags+=(--preemptible)
fi
read -r -a extra <<<"${CREATE_FLAGS:-}"

run gcloud compute tpus tpu-vm create "$TPU_NAME" "${TPU_FLAGS[@]}" "${flags[@]}" "${extra[@]}"
