# shellcheck shell=bash disable=SC2034
# (SC2034: the settings defined here are used by the scripts that source this file.)
# Settings and helpers shared by the tpu/*.sh scripts (sourced, not run).
#
# Every setting is an environment variable with a default that the environment overrides:
#
#   TPU_NAME          name of the TPU VM / pod slice (required)
#   ZONE              its zone, e.g. us-central2-b (v4), us-west4-a (v5e) (required)
#   PROJECT           Google Cloud project; passed as --project when set (else gcloud's default)
#   ACCELERATOR_TYPE  v4-8 (default), v5litepod-8, v4-64, v5litepod-64, ...
#   RUNTIME_VERSION   TPU software version; default from ACCELERATOR_TYPE:
#                     v4-* tpu-ubuntu2204-base, v5litepod-* v2-alpha-tpuv5-lite,
#                     v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e
#   REPO_URL, REPO_REF  install the project on the workers from this git URL at this ref
#                     (branch, tag or commit; default main)
#   LOCAL_REPO        ... or from this local checkout, copied with scp (default: the checkout
#                     holding these scripts, when REPO_URL is not set)
#   BUCKET            GCS bucket (name or gs://name) mounted with gcsfuse at MOUNT_DIR on every
#                     worker: put `out=` there, so that all hosts write one checkpoint directory
#   MOUNT_DIR         default /mnt/loraprune
#   GCSFUSE_FLAGS     default "--implicit-dirs --rename-dir-limit=200000" (orbax and the HF export
#                     rename directories, which gcsfuse refuses without --rename-dir-limit)
#   PYTHON            Python on the workers (default python3.11; installed with apt if missing)
#   JAX_VERSION       default 0.10.2 (the version pyproject.toml pins)
#   GCLOUD_SSH_FLAGS  extra flags for `tpu-vm ssh` and `tpu-vm scp`, e.g. --internal-ip
#   DRY_RUN=1         print each command (`+ cmd ...`, quoted so that it can be pasted) and run
#                     nothing
#
# On the workers, the project lives in ~/loraprune-jax, its virtual environment in
# ~/loraprune-venv and the job logs in ~/loraprune-logs.

set -euo pipefail

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "${0##*/}: needs bash >= 4.4 (this is $BASH_VERSION; on macOS: brew install bash)" >&2
  exit 2
fi

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
if [[ -z $RUNTIME_VERSION ]]; then
  case $ACCELERATOR_TYPE in
    v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
  esac
fi
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-main}"
LOCAL_REPO="${LOCAL_REPO:-}"
BUCKET="${BUCKET:-}"
BUCKET="${BUCKET#gs://}"
BUCKET="${BUCKET%/}"
MOUNT_DIR="${MOUNT_DIR:-/mnt/loraprune}"
MOUNT_DIR="${MOUNT_DIR%/}"
GCSFUSE_FLAGS="${GCSFUSE_FLAGS:---implicit-dirs --rename-dir-limit=200000}"
PYTHON="${PYTHON:-python3.11}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
LIBTPU_FIND_LINKS="https://storage.googleapis.com/jax-releases/libtpu_releases.html"
GCLOUD_SSH_FLAGS="${GCLOUD_SSH_FLAGS:-}"
DRY_RUN="${DRY_RUN:-0}"

# The directory of these scripts and the checkout that holds them.
case ${BASH_SOURCE[0]} in
  */*) TPU_DIR="${BASH_SOURCE[0]%/*}" ;;
  *) TPU_DIR=. ;;
esac
TPU_DIR="$(cd "$TPU_DIR" && pwd)"
REPO_ROOT="$(cd "$TPU_DIR/.." && pwd)"

# Paths on the workers, written for the remote shell (it expands $HOME there).
R_REPO="\$HOME/loraprune-jax"
R_VENV="\$HOME/loraprune-venv"
R_LOGS="\$HOME/loraprune-logs"

die() {
  echo "${0##*/}: $*" >&2
  exit 2
}

# usage_error MESSAGE: the calling script's usage (its `usage` function), then MESSAGE; exit 2.
usage_error() {
  if declare -F usage >/dev/null; then
    usage >&2
  fi
  die "$@"
}

# -h or --help as the first argument prints the calling script's usage and ends it.
help_if_asked() {
  if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    usage
    exit 0
  fi
}

# For scripts that take no arguments (their settings are environment variables): -h or --help
# prints the script's usage, anything else is a usage error.
no_arguments() {
  help_if_asked "$@"
  if (($#)); then
    usage_error "takes no arguments (settings are environment variables)"
  fi
}

# require VAR...: a usage error naming every listed variable that is empty.
require() {
  local var missing=()
  for var in "$@"; do
    if [[ -z ${!var:-} ]]; then
      missing+=("$var")
    fi
  done
  if ((${#missing[@]})); then
    usage_error "missing setting(s): ${missing[*]} (set them in the environment, e.g." \
      "TPU_NAME=my-tpu ZONE=us-central2-b ${0##*/} ...)"
  fi
}

# shquote ARG: ARG as one shell word (unchanged when it needs no quoting, else in single quotes).
shquote() {
  if [[ -n $1 && $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    local s=${1//\'/\'\\\'\'}
    printf "'%s'" "$s"
  fi
}

# run CMD ARG...: print `+ CMD ARG...` (each word quoted, so the line can be pasted into a
# shell), then run it unless DRY_RUN=1.
run() {
  local line="+" arg
  for arg in "$@"; do
    line+=" $(shquote "$arg")"
  done
  printf '%s\n' "$line"
  if [[ $DRY_RUN != 1 ]]; then
    "$@"
  fi
}

# rq ARG...: the arguments as words for the remote (bash) shell, quoted with printf %q.
rq() {
  local out="" arg q
  for arg in "$@"; do
    printf -v q '%q' "$arg"
    out+="${out:+ }$q"
  done
  printf '%s' "$out"
}

# Flags every gcloud tpu-vm command takes, and those for ssh/scp.
TPU_FLAGS=(--zone "$ZONE")
if [[ -n $PROJECT ]]; then
  TPU_FLAGS+=(--project "$PROJECT")
fi
read -r -a SSH_FLAGS <<<"$GCLOUD_SSH_FLAGS"

# tpu_ssh WORKER COMMAND: run the remote shell COMMAND on one worker (0, 1, ...) or all.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU_FLAGS[@]}" "${SSH_FLAGS[@]}" \
    "--worker=$1" --command "$2"
}

# tpu_scp SRC DEST: copy a local file or directory to DEST (relative to the remote home, or
# absolute) on every worker.
tpu_scp() {
  run gcloud compute tpus tpu-vm scp --recurse "$1" "$TPU_NAME:$2" "${TPU_FLAGS[@]}" \
    "${SSH_FLAGS[@]}" --worker=all
}
