#!/usr/bin/env bash
# Follow the job log of one worker (default 0) or of all workers of TPU_NAME.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: TPU_NAME=NAME ZONE=ZONE [RUN_NAME=NAME] [TAIL_LINES=200] [FOLLOW=0] [DRY_RUN=1]
       tpu/logs.sh [WORKER | all]

Streams ~/loraprune-logs/latest.log (the last job tpu/launch.sh started; RUN_NAME=NAME picks
~/loraprune-logs/NAME.log) of worker WORKER (default 0; `all`: every worker, each line prefixed
with its host name) with `tail -F` over ssh; Ctrl-C stops following. FOLLOW=0 prints the last
TAIL_LINES lines and returns.
USAGE
}

case ${BASH_SOURCE[0]} in */*) here="${BASH_SOURCE[0]%/*}" ;; *) here=. ;; esac
# shellcheck source=SCRIPTDIR/config.sh
source "$here/config.sh"

help_if_asked "$@"
(($# <= 1)) || usage_error "expected at most one argument (a worker number or all), got $#"
worker="${1:-0}"
[[ $worker =~ ^([0-9]+|all)$ ]] || usage_error "WORKER must be a number (0, 1, ...) or all, got '$worker'"
require TPU_NAME ZONE

lines="${TAIL_LINES:-200}"
[[ $lines =~ ^[0-9]+$ ]] || usage_error "TAIL_LINES must be a number, got '$lines'"
log="$R_LOGS/latest.log"
if [[ -n ${RUN_NAME:-} ]]; then
  log="$R_LOGS/$(rq "$RUN_NAME").log"
fi
cmd="tail -n $lines"
if [[ ${FOLLOW:-1} != 0 ]]; then
  cmd+=" -F"
fi
cmd+=" \"$log\""
if [[ $worker == all ]]; then
  cmd+=" | sed -u \"s/^/\$(hostname): /\""
fi
tpu_ssh "$worker" "$cmd"
