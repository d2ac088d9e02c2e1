#!/usr/bin/env bash
# Start `loraprune-jax prune --distributed ARGS` on every worker of TPU_NAME at once.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: TPU_NAME=NAME ZONE=ZONE [RUN_NAME=NAME] [DRY_RUN=1] tpu/launch.sh key=value ...
       TPU_NAME=NAME ZONE=ZONE tpu/launch.sh --resume OUT_DIR

Runs, on every worker at once (gcloud compute tpus tpu-vm ssh NAME --worker=all), in the
background under nohup:
  cd ~/loraprune-jax && ~/loraprune-venv/bin/loraprune-jax prune --distributed --no-progress ARGS
ARGS are passed on exactly as given (prune keys, --config FILE or --resume DIR); every worker
runs the same command and `--distributed` makes each one call jax.distributed.initialize().
Put `out=` under the bucket mount (MOUNT_DIR, /mnt/loraprune), so that all hosts write one
checkpoint directory; paths are paths on the workers.
These variables, when set here, are set for the job too: TFDS_DATA_DIR, LORAPRUNE_JAX_CACHE,
XLA_FLAGS, LIBTPU_INIT_ARGS, JAX_COMPILATION_CACHE_DIR, HF_HOME, TPU_STDERR_LOG_LEVEL,
TPU_MIN_LOG_LEVEL (and those named in PASS_ENV="NAME ...").
Each worker logs to ~/loraprune-logs/RUN_NAME.log (RUN_NAME: the name of out= or of the resumed
directory, and the time), linked as ~/loraprune-logs/latest.log; follow it with tpu/logs.sh.
Example:
  tpu/launch.sh model=/home/$USER/llama-7b 'data=tfds:c4/en:train[:1%]' \
    out=/mnt/loraprune/llama7b-lora-0.5 dtype=bfloat16 mesh=fsdp:-1 prune.ratio=0.5
USAGE
}

case ${BASH_SOURCE[0]} in */*) here="${BASH_SOURCE[0]%/*}" ;; *) here=. ;; esac
# shellcheck source=SCRIPTDIR/config.sh
source "$here/config.sh"

help_if_asked "$@"
(($#)) || usage_error "no arguments: give the prune arguments (key=value ...) or --resume OUT_DIR"
require TPU_NAME ZONE

# Where the run writes: out=DIR, or the directory given to --resume.
out=""
prev=""
for arg in "$@"; do
  case $arg in
    out=*) out="${arg#out=}" ;;
    --resume=*) out="${arg#--resume=}" ;;
  esac
  if [[ $prev == --resume ]]; then
    out="$arg"
  fi
  prev="$arg"
done
if [[ $prev == --resume ]]; then
  usage_error "--resume needs the output directory of the run to continue"
fi
if [[ -z ${RUN_NAME:-} ]]; then
  name="${out%/}"
  name="${name##*/}"
  name="${name//[^A-Za-z0-9_.,+=-]/-}"
  RUN_NAME="${name:-prune}-$(date +%Y%m%d-%H%M%S)"
fi
[[ $RUN_NAME =~ ^[A-Za-z0-9_.,+=-]+$ ]] ||
  usage_error "RUN_NAME=$RUN_NAME: use letters, digits and . _ - + = , only (it names the log file)"

# The environment of the job: assignments in front of the command, quoted for the remote shell.
env_words=""
read -r -a pass_env <<<"TFDS_DATA_DIR LORAPRUNE_JAX_CACHE XLA_FLAGS LIBTPU_INIT_ARGS \
JAX_COMPILATION_CACHE_DIR HF_HOME TPU_STDERR_LOG_LEVEL TPU_MIN_LOG_LEVEL ${PASS_ENV:-}"
for var in "${pass_env[@]}"; do
  [[ $var =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || usage_error "PASS_ENV: $var is not a variable name"
  if [[ -n ${!var+set} ]]; then
    env_words+="$var=$(rq "${!var}") "
  fi
done

config=0
for arg in "$@"; do
  if [[ $arg == --config || $arg == --config=* ]]; then
    config=1
  fi
done
if [[ -z $out && $config == 0 ]]; then
  echo "${0##*/}: warning: no out=: each worker would write its own runs/ directory in its" \
    "copy of the repository; on a multi-host slice give out=$MOUNT_DIR/NAME" >&2
elif [[ -n $out && $out != "$MOUNT_DIR"/* ]]; then
  echo "${0##*/}: warning: out=$out is not under the bucket mount $MOUNT_DIR: on a multi-host" \
    "slice all hosts must write the same directory" >&2
fi

log="$R_LOGS/$RUN_NAME.log"
tpu_ssh all "set -euo pipefail
mkdir -p \"$R_LOGS\"
if [ -f \"$R_LOGS/job.pid\" ] && kill -0 \"\$(cat \"$R_LOGS/job.pid\")\" 2>/dev/null; then
  echo \"\$(hostname): a job is still running (pid \$(cat \"$R_LOGS/job.pid\")); stop it with tpu/teardown.sh --stop-only\" >&2
  exit 1
fi
cd \"$R_REPO\"
${env_words}nohup \"$R_VENV/bin/loraprune-jax\" $(rq prune --distributed --no-progress "$@") >\"$log\" 2>&1 </dev/null &
echo \$! >\"$R_LOGS/job.pid\"
ln -sfn $(rq "$RUN_NAME.log") \"$R_LOGS/latest.log\"
echo \"\$(hostname): started pid \$! logging to $log\""

if [[ $DRY_RUN != 1 ]]; then
  echo "${0##*/}: started $RUN_NAME on every worker of $TPU_NAME; follow worker 0 with:" \
    "TPU_NAME=$TPU_NAME ZONE=$ZONE tpu/logs.sh" >&2
fi
