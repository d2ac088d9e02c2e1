#!/usr/bin/env bash
# Copy a model / data directory (or file) to every worker of TPU_NAME.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: TPU_NAME=NAME ZONE=ZONE [DRY_RUN=1] tpu/copy_data.sh SRC [DEST]

Copies SRC into the directory DEST on every worker (like `cp -r SRC DEST/`: a directory SRC ends
up as DEST/<name of SRC>). DEST is on the workers: absolute, or relative to the home directory
there (default: the home directory; a leading ~/ means the same).
  SRC gs://BUCKET/PATH  each worker runs `gcloud storage cp -r gs://BUCKET/PATH DEST/` (fast: the
                        workers read the bucket in parallel; they need read access to it)
  SRC a local path      `gcloud compute tpus tpu-vm scp --recurse SRC NAME:DEST --worker=all`
                        (slow for a large model: upload it to a bucket once instead)
Examples:
  tpu/copy_data.sh gs://my-bucket/llama-7b               # -> ~/llama-7b on every worker
  tpu/copy_data.sh gs://my-bucket/tensorflow_datasets    # -> ~/tensorflow_datasets
  tpu/copy_data.sh ./llama-7b models                     # -> ~/models/llama-7b
USAGE
}

case ${BASH_SOURCE[0]} in */*) here="${BASH_SOURCE[0]%/*}" ;; *) here=. ;; esac
# shellcheck source=SCRIPTDIR/config.sh
source "$here/config.sh"

help_if_asked "$@"
(($# == 1 || $# == 2)) || usage_error "expected SRC [DEST], got $# argument(s)"
require TPU_NAME ZONE

src="$1"
dest="${2:-.}"
# ~ and ~/x on the workers: the home directory there, which is where ssh and scp start.
case $dest in
  \~ | \~/) dest=. ;;
  \~/*) dest="${dest#\~/}" ;;
esac
[[ -n $src && -n $dest ]] || usage_error "empty SRC or DEST"

if [[ $src == gs://* ]]; then
  src="${src%/}"
  tpu_ssh all "set -euo pipefail
mkdir -p $(rq "$dest")
gcloud storage cp -r $(rq "$src" "$dest/")
echo \"\$(hostname): copied $(rq "$src") into $(rq "$dest")\""
else
  [[ -e $src ]] || usage_error "SRC=$src: no such file or directory (a gs:// URL or a local path)"
  src="${src%/}"
  if [[ $dest != . ]]; then
    tpu_ssh all "mkdir -p $(rq "$dest")"
  fi
  tpu_scp "$src" "$dest"
fi
