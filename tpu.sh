#!/usr/bin/env bash
# tpu.sh: run this repo on every worker (host) of a Cloud TPU VM pod, through gcloud.
#
#   bash tpu.sh create [EXTRA GCLOUD FLAGS]   create the TPU VM (e.g. --spot)
#   bash tpu.sh setup                 sync, then pip install jax[tpu], requirements.txt, gcsfs
#   bash tpu.sh sync                  put exactly the local code on every worker
#   bash tpu.sh run -- CMD...         start CMD on all workers at once, in the background
#   bash tpu.sh logs [WORKER]         follow the log of worker 0 (or WORKER)
#   bash tpu.sh status                which workers are training
#   bash tpu.sh stop                  SIGTERM (train.py checkpoints), SIGKILL, free the TPU
#   bash tpu.sh delete                delete the TPU VM
#
# Settings (environment): TPU_NAME ZONE PROJECT, and for create also ACCELERATOR (e.g. v4-64)
# and RUNTIME_VERSION (e.g. tpu-ubuntu2204-base). Optional: REPO_DIR on the workers (default
# '~/hint', quote the ~), RETRIES (3) and RETRY_SLEEP (10 s) for ssh/scp, STOP_GRACE (120 s),
# DRY_RUN=1 (print the gcloud commands instead of running them).
# On each worker the run's log is ~/hint-logs/run.log and its pid is in ~/hint-logs/run.pid.
# Example: bash tpu.sh run -- python3 train.py --task ni --out-dir gs://BUCKET/run
# Remote scripts are single-quoted on purpose ($R and ~ expand on the worker):
# shellcheck disable=SC2016,SC2088
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)   # the local checkout that sync ships
REPO_DIR=${REPO_DIR:-'~/hint'}
WORK=''                                              # local temp dir, removed on exit
trap '[[ -z $WORK ]] || rm -rf "$WORK"' EXIT

die() { echo "tpu.sh: $*" >&2; exit 1; }

usage() {
  echo "usage:" >&2
  sed -n '3,11s/^# //p' "${BASH_SOURCE[0]}" >&2   # the command list in the header above
  exit 2
}

need() {  # need VAR...: one-line error and exit 2 for the first unset setting
  local v
  for v in "$@"; do
    if [[ -z ${!v:-} ]]; then
      echo "tpu.sh: $v is not set (export $v=...)" >&2
      exit 2
    fi
  done
}

quote_line() {  # print argv as one shell line that can be copy-pasted
  local out='' a safe='^[A-Za-z0-9_./:=@%+,-]+$' q="'\\''"
  for a in "$@"; do
    if [[ $a =~ $safe ]]; then out+="$a "; else out+="'${a//\'/$q}' "; fi
  done
  echo "${out% }"
}

# gcloud_tpu VERB NAME ARGS...: `gcloud compute tpus tpu-vm` with zone and project; DRY_RUN
# prints instead. Worker commands (--worker=...) are retried when ssh/scp itself fails (exit
# 255; a remote command's own exit code is passed through by gcloud and is not retried).
gcloud_tpu() {
  local cmd=(gcloud compute tpus tpu-vm "$1" "$2" --zone "$ZONE" --project "$PROJECT" "${@:3}")
  if [[ ${DRY_RUN:-0} == 1 ]]; then quote_line "${cmd[@]}"; return 0; fi
  local target='' a rc n=1 tries=${RETRIES:-3}
  for a in "$@"; do
    if [[ $a == --worker=* ]]; then target="worker ${a#--worker=}: "; fi
  done
  while true; do
    rc=0; "${cmd[@]}" || rc=$?
    if (( rc == 0 )); then return 0; fi
    [[ -n $target ]] || die "$1 failed (exit $rc)"
    (( rc == 255 )) || die "${target}remote command failed (exit $rc)"
    (( n < tries )) || die "${target}$1 failed $n times (exit $rc, gcloud's error is above)"
    echo "tpu.sh: ${target}$1 failed (exit $rc), try $((n + 1))/$tries" \
      "in ${RETRY_SLEEP:-10} s" >&2
    sleep "${RETRY_SLEEP:-10}"
    n=$((n + 1))
  done
}

# The remote scripts below are written on several lines for reading; oneline() joins them
# (so every line ends in ; & && then do else or the closing quote). Each one runs after
# remote_vars, which sets R (repo dir), L (log dir), "$@" (run's command) and alive PID
# (true for a live process, false for none, a dead one or a zombie) on the worker.
oneline() { local s; s=$(printf '%s\n' "$1" | sed 's/^ *//' | tr '\n' ' '); echo "${s% }"; }

remote_vars() {  # remote_vars ARG...: the quoted prefix of every remote command
  local r=$REPO_DIR
  if [[ $r == '~/'* ]]; then r="~/$(printf '%q' "${r#'~/'}")"; else r=$(printf '%q' "$r"); fi
  local argv; argv=$(printf '%q ' "$@")   # run's command, each argument quoted
  if (( $# > 0 )); then printf 'set -- %s; ' "${argv% }"; fi
  printf 'R=%s; L=~/hint-logs; ' "$r"
  printf 'alive() { ps -o stat= -p "$1" 2>/dev/null | grep -qv Z; }; '
}

ssh_all() { gcloud_tpu ssh "$TPU_NAME" --worker=all --command "$1"; }

cmd_create() {
  need TPU_NAME ZONE PROJECT ACCELERATOR RUNTIME_VERSION
  gcloud_tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR" \
    --version "$RUNTIME_VERSION" "$@"
}

cmd_delete() { need TPU_NAME ZONE PROJECT; gcloud_tpu delete "$TPU_NAME" --quiet; }

# sync ships a tarball of the local tree as git sees it (tracked + untracked-not-ignored
# files, uncommitted edits included) in every case, rather than fetching a commit: workers
# need no git remote or network, and all of them get the very same bytes. Files of the
# previous sync are removed first (so deletions propagate); anything else, e.g. runs/, stays.
SYNC_SCRIPT='mkdir -p "$R" && cd "$R" || exit 1;
  if [ -f .synced-files ]; then xargs -d "\n" rm -f < .synced-files; fi;
  tar -xzf ~/hint-code.tar.gz || exit 1;
  tar --quoting-style=literal -tzf ~/hint-code.tar.gz > .synced-files;
  echo "$REV" > REVISION; rm -f ~/hint-code.tar.gz;
  echo "worker $(hostname): $R is at $REV"'

cmd_sync() {
  need TPU_NAME ZONE PROJECT
  local rev f
  rev=$(git -C "$HERE" rev-parse HEAD)
  if [[ -n $(GIT_OPTIONAL_LOCKS=0 git -C "$HERE" status --porcelain) ]]; then rev+=-dirty; fi
  WORK=$(mktemp -d)
  git -C "$HERE" ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do
    if [[ -e $HERE/$f || -L $HERE/$f ]]; then printf '%s\0' "$f"; fi  # skip deleted files
  done | (cd "$HERE" && COPYFILE_DISABLE=1 tar --null -T - -czf "$WORK/code.tar.gz")
  gcloud_tpu scp "$WORK/code.tar.gz" "$TPU_NAME:hint-code.tar.gz" --worker=all
  ssh_all "$(remote_vars)REV=$rev; $(oneline "$SYNC_SCRIPT")"
  [[ ${DRY_RUN:-0} == 1 ]] || echo "tpu.sh: revision $rev on all workers of $TPU_NAME"
}

SETUP_SCRIPT='cd "$R" && python3 -m pip install -U "jax[tpu]" &&
  python3 -m pip install -r requirements.txt gcsfs'   # gcsfs: --out-dir gs://...

cmd_setup() {  # setup = sync + pip installs; running it again is harmless
  cmd_sync
  ssh_all "$(remote_vars)$(oneline "$SETUP_SCRIPT")"
}

# run starts "$@" detached (setsid: own session and process group, survives the ssh session)
# and refuses while an earlier run is alive. A retry after an ssh failure (same ID) does not
# start a worker twice.
RUN_SCRIPT='mkdir -p "$L" && cd "$R" || exit 1;
  if alive "$(cat "$L/run.pid" 2>/dev/null)"; then
    if [ "$(cat "$L/run.id" 2>/dev/null)" = "$ID" ]; then
      echo "worker $(hostname): started"; exit 0; fi;
    echo "worker $(hostname): busy (pid $(cat "$L/run.pid")), bash tpu.sh stop first" >&2;
    exit 3;
  fi;
  echo "$ID" > "$L/run.id";
  nohup setsid "$@" > "$L/run.log" 2>&1 < /dev/null &
  echo $! > "$L/run.pid"; echo "worker $(hostname): started pid $!, log $L/run.log"'

cmd_run() {
  if [[ ${1:-} == -- ]]; then shift; fi
  (( $# > 0 )) || usage
  need TPU_NAME ZONE PROJECT
  ssh_all "$(remote_vars "$@")ID=$(date +%Y%m%d-%H%M%S)-$$; $(oneline "$RUN_SCRIPT")"
}

cmd_logs() {
  local w=${1:-0}
  [[ $w =~ ^[0-9]+$ ]] || usage
  need TPU_NAME ZONE PROJECT
  gcloud_tpu ssh "$TPU_NAME" --worker="$w" --command 'tail -n 100 -F ~/hint-logs/run.log'
}

STATUS_SCRIPT='PID=$(cat "$L/run.pid" 2>/dev/null); REV=$(cat "$R/REVISION" 2>/dev/null);
  if alive "$PID"; then echo "worker $(hostname): training (pid $PID), code ${REV:-none}";
  else echo "worker $(hostname): idle, code ${REV:-none}"; fi'

cmd_status() { need TPU_NAME ZONE PROJECT; ssh_all "$(remote_vars)$(oneline "$STATUS_SCRIPT")"; }

# stop: SIGTERM the run's process group (train.py saves a checkpoint and exits), SIGKILL what
# is left after STOP_GRACE s, then what the HINT README had users do by hand: remove the
# libtpu lock file and kill whatever still holds the TPU (/dev/accel*: v4; /dev/vfio/N: v5+).
STOP_SCRIPT='P="$L/run.pid"; PID=$(cat "$P" 2>/dev/null || true);
  if alive "$PID"; then
    kill -TERM -- "-$PID" 2>/dev/null || kill -TERM "$PID";
    echo "worker $(hostname): SIGTERM to pid $PID"; i=0;
    while alive "$PID" && [ "$i" -lt "$GRACE" ]; do sleep 1; i=$((i+1)); done;
    if alive "$PID"; then echo "worker $(hostname): SIGKILL after $GRACE s"; fi;
    kill -KILL -- "-$PID" 2>/dev/null || kill -KILL "$PID" 2>/dev/null || true;
  fi;
  rm -f "$P"; sudo rm -f /tmp/libtpu_lockfile;
  sudo fuser -k /dev/accel* /dev/vfio/[0-9]* > /dev/null 2>&1 || true;
  echo "worker $(hostname): stopped"'

cmd_stop() {
  need TPU_NAME ZONE PROJECT
  local grace=${STOP_GRACE:-120}
  [[ $grace =~ ^[0-9]+$ ]] || die "STOP_GRACE must be a number of seconds"
  ssh_all "$(remote_vars)GRACE=$grace; $(oneline "$STOP_SCRIPT")"
}

case ${1:-} in
  create | setup | sync | run | logs | status | stop | delete) sub=$1; shift; "cmd_$sub" "$@" ;;
  *) usage ;;
esac
