#!/usr/bin/env bash
# Keep a run alive: check the slice every --interval seconds; when it is missing, PREEMPTED or
# TERMINATED (queued resource: SUSPENDED or FAILED) delete it, recreate it, reinstall and rerun
# the config. The run resumes by itself from the workdir's latest checkpoint. On a healthy
# slice where nothing runs yet it installs and starts the run, so this one command also brings
# a run up from nothing. A run that exits 75 (it stopped on SIGTERM/SIGINT after saving a
# checkpoint at its current step), or 130/143 (the signal came during its imports) is resumed
# at once. Exits 0 when the run finishes, 1 when it
# crashes on a healthy slice (last log lines shown), 2 after --max-relaunches relaunches.
#
#   launch/watch.sh --name=NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME
#                   --workdir=gs://BUCKET/RUN [--project=PROJECT] [--queued] [--spot]
#                   [--repo=GIT_URL [--ref=REF]] [--config=configs/pretrain.py:paper]
#                   [--config.x=y ...] [--interval=120] [--max-relaunches=10] [--dry-run]
#
# The flags mean what they mean in create.sh, install.sh and train.sh. --dry-run prints one
# check, as if the slice had been preempted, and the commands that relaunch it.

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

accepted="name zone project accelerator-type version queued spot repo ref workdir config overrides"
parse_args "$accepted interval max-relaunches" "$@"
require name zone accelerator-type version workdir config

relaunches=0
crash_seen=0  # a nonzero exit seen once; seen again on a still-healthy slice, it is a crash

# Steps are chained with || return: errexit is off inside the `if` that calls this.
relaunch() {
  if ((relaunches >= MAX_RELAUNCHES)); then
    die "gave up after $relaunches relaunches (--max-relaunches)"
  fi
  relaunches=$((relaunches + 1))
  log "slice $NAME is $1: relaunch $relaunches (at most $MAX_RELAUNCHES)"
  case $1 in
    READY | ACTIVE) ;;  # healthy, nothing running: install and start only
    MISSING) create_slice || return 1 ;;
    *) delete_slice || return 1; create_slice || return 1 ;;
  esac
  wait_ready || return 1
  install_repo || return 1
  start_train
}

while :; do
  state=$(slice_state PREEMPTED)
  case $state in
    READY | ACTIVE)
      status=$(train_status)
      case $status in
        running) crash_seen=0 ;;
        none) if ! relaunch "$state"; then log "relaunch failed; trying again at the next check"; fi ;;
        exited:0) log "the run on $NAME finished; delete the slice with launch/delete.sh"; exit 0 ;;
        exited:75 | exited:130 | exited:143)
          # 75: SIGTERM/SIGINT, and it saved a checkpoint at its current step. 130/143: the
          # signal came while it was still starting (importing), before it had anything to save.
          crash_seen=0
          log "the run on $NAME stopped on a signal (exit ${status#exited:}); resuming it"
          if ! relaunch "$state"; then log "relaunch failed; trying again at the next check"; fi ;;
        exited:*)
          if ((crash_seen)); then
            log "the run on $NAME exited with status ${status#exited:} on a healthy slice;" \
              "last log lines:"
            tpu_ssh 0 "tail -n 50 $REMOTE_LOG" || true
            exit 1
          fi
          crash_seen=1
          log "the run on $NAME exited with status ${status#exited:};" \
            "checking once more in case the slice was preempted" ;;
        *) log "no clear answer from worker 0 of $NAME ('$status'); checking again" ;;
      esac ;;
    PREEMPTED | TERMINATED | SUSPENDED | FAILED | MISSING)
      crash_seen=0
      if ! relaunch "$state"; then log "relaunch failed; trying again at the next check"; fi ;;
    *) log "slice $NAME is $state; waiting" ;;
  esac
  if ((DRY_RUN)); then exit 0; fi
  sleep "$INTERVAL"
done
