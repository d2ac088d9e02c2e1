#!/usr/bin/env bash
# Stop the job on every worker of TPU_NAME and delete the TPU.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: TPU_NAME=NAME ZONE=ZONE [YES=1] [DRY_RUN=1] tpu/teardown.sh [--stop-only]

Stops the loraprune-jax job on every worker (SIGTERM, SIGKILL after 30 s), then deletes the TPU
(gcloud compute tpus tpu-vm delete NAME --quiet) after asking for confirmation (YES=1: don't
ask). --stop-only stops the job and keeps the TPU (e.g. to launch again). A stopped run continues
from its last checkpoint with tpu/launch.sh --resume OUT_DIR. Deleting the TPU deletes its boot
disks (the data copied there, the logs); what the job wrote to the bucket stays.
USAGE
}

case ${BASH_SOURCE[0]} in */*) here="${BASH_SOURCE[0]%/*}" ;; *) here=. ;; esac
# shellcheck source=SCRIPTDIR/config.sh
source "$here/config.sh"

stop_only=0
case ${1:-} in
  -h | --help)
    usage
    exit 0
    ;;
  --stop-only) stop_only=1 ;;
  "") ;;
  *) usage_error "unknown argument: $1" ;;
esac
(($# <= 1)) || usage_error "expected at most one argument"
require TPU_NAME ZONE

if [[ $stop_only == 0 && ${YES:-0} != 1 ]]; then
  project_text=""
  if [[ -n $PROJECT ]]; then
    project_text=" of project $PROJECT"
  fi
  read -r -p "Delete TPU $TPU_NAME in $ZONE$project_text? [y/N] " answer || answer=""
  if [[ $answer != [yY] && $answer != [yY][eE][sS] ]]; then
    echo "${0##*/}: aborted; nothing stopped or deleted" >&2
    exit 1
  fi
fi

# Match the job by its command line; the brackets keep the pattern from matching the remote
# shell that runs this very command (its command line holds "[l]oraprune...").
stop="pat=\"[l]oraprune-venv/bin/loraprune-jax prune\"
if pkill -f \"\$pat\"; then
  echo \"\$(hostname): sent SIGTERM to the job\"
  for _ in \$(seq 30); do pgrep -f \"\$pat\" >/dev/null || break; sleep 1; done
  if pkill -9 -f \"\$pat\"; then echo \"\$(hostname): sent SIGKILL to the job\"; fi
else
  echo \"\$(hostname): no job running\"
fi
rm -f \"$R_LOGS/job.pid\""

if [[ $stop_only == 1 ]]; then
  tpu_ssh all "$stop"
  exit 0
fi
# The TPU goes anyway: a worker that cannot be reached must not keep it (and its cost) alive.
tpu_ssh all "$stop" || echo "${0##*/}: warning: could not stop the job on every worker; deleting anyway" >&2
run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${TPU_FLAGS[@]}" --quiet
