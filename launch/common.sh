# shellcheck shell=bash
# Shared by the launch/*.sh scripts (sourced, never run): flag parsing, the dry-run aware `run`
# wrapper, and the one home of every gcloud command the scripts issue (create, describe,
# install, train, status, delete). Written for bash 3.2 too (macOS laptops): no associative
# arrays, and possibly-empty arrays are expanded as ${a[@]+"${a[@]}"} because of `set -u`.

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$LAUNCH_DIR/.." && pwd)

# libtpu wheels; override by exporting LIBTPU_FIND_LINKS before calling a script.
LIBTPU_FIND_LINKS=${LIBTPU_FIND_LINKS:-https://storage.googleapis.com/jax-releases/libtpu_releases.html}

# Paths on every worker. ssh commands start in $HOME; "\$HOME" is expanded there, not here.
REMOTE_REPO="\$HOME/clusterstm_jax"
REMOTE_TARBALL_NAME=clusterstm_jax.tgz
REMOTE_VENV="\$HOME/clusterstm_venv"
REMOTE_LOG="\$HOME/clusterstm_train.log"
REMOTE_PID="\$HOME/clusterstm_train.pid"
REMOTE_EXIT="\$HOME/clusterstm_train.exit"
# A remote test: true while the run started by start_train is alive on that worker.
REMOTE_RUNNING="[ -f $REMOTE_PID ] && kill -0 \"\$(cat $REMOTE_PID)\" 2>/dev/null"

# Flag values (defaults here); parse_args fills them from --flag=value or --flag value.
DRY_RUN=0
QUEUED=0
SPOT=0
NAME='' ZONE='' PROJECT='' ACCELERATOR_TYPE='' VERSION='' WORKDIR='' REPO='' REF=''
CONFIG=configs/pretrain.py:paper
WORKER=0
INTERVAL=120
MAX_RELAUNCHES=10
OVERRIDES=()

# `run` prints to the caller's stdout even inside $(...): fd 3 is the script's stdout.
exec 3>&1

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

# The script's header comment (after the shebang, up to the first blank line) is its --help.
usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

# Quote one argument for a POSIX shell; plain words stay as they are so commands stay readable.
shquote() {
  # Replacement held in variables: quotes inside ${x//a/b} parse differently across bash versions.
  local sq="'" escaped="'\\''"
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//$sq/$escaped}"
  fi
}

quote_cmd() {  # joins quoted arguments; --flag=value quotes only the value: --command='...'
  local out='' arg
  for arg in "$@"; do
    if [[ $arg =~ ^--[A-Za-z0-9.-]+= ]]; then
      out+="${out:+ }${BASH_REMATCH[0]}$(shquote "${arg#"${BASH_REMATCH[0]}"}")"
    else
      out+="${out:+ }$(shquote "$arg")"
    fi
  done
  printf '%s' "$out"
}

# Every external command goes through here: printed as '+ cmd' (a copy-pasteable line); in a
# dry run that is all that happens, otherwise it is then executed.
run() {
  if ((DRY_RUN)); then
    echo "+ $(quote_cmd "$@")" >&3
  else
    echo "+ $(quote_cmd "$@")" >&2
    "$@"
  fi
}

# parse_args "name zone ... overrides" "$@": only the listed flags are accepted by the caller.
parse_args() {
  local allowed=" $1 " flag value has_value var
  shift
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --config.*)
        [[ $allowed == *" overrides "* ]] ||
          die "$(basename "$0") takes no --config.* overrides (got '$1')"
        OVERRIDES+=("$1"); shift; continue ;;
      --*=*) flag=${1%%=*}; value=${1#*=}; has_value=1; shift ;;
      --*) flag=$1; value=''; has_value=0; shift ;;
      *) die "unexpected argument '$1' (flags look like --name=my-tpu; see --help)" ;;
    esac
    flag=${flag#--}
    [[ $allowed == *" $flag "* ]] || die "unknown flag --$flag (see --help)"
    case $flag in
      queued) QUEUED=1 ;;
      spot) SPOT=1 ;;
      *)
        if ((!has_value)); then
          [[ $# -gt 0 && $1 != --* ]] || die "flag --$flag needs a value"
          value=$1; shift
        fi
        var=$(echo "$flag" | tr 'a-z-' 'A-Z_')
        printf -v "$var" '%s' "$value" ;;
    esac
  done
  SCOPE=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then SCOPE+=(--project="$PROJECT"); fi
}

# require name zone ...: every listed flag must have a non-empty value; then sanity checks.
require() {
  local flag var
  for flag in "$@"; do
    var=$(echo "$flag" | tr 'a-z-' 'A-Z_')
    [[ -n ${!var:-} ]] || die "missing required flag --$flag (see --help)"
  done
  if [[ -n $ACCELERATOR_TYPE && ! $ACCELERATOR_TYPE =~ ^v[0-9]+[a-z]*-[0-9]+$ ]]; then
    die "--accelerator-type='$ACCELERATOR_TYPE' is not a TPU type like v4-32, v5p-32 or v5litepod-16"
  fi
  if [[ -n $WORKDIR && $WORKDIR != gs://?* ]]; then
    die "--workdir='$WORKDIR' must be a gs:// path: all workers write and resume from one workdir"
  fi
  if [[ -n $REF && -z $REPO ]]; then die "--ref needs --repo (a git URL the workers can clone)"; fi
  [[ $WORKER =~ ^([0-9]+|all)$ ]] || die "--worker='$WORKER' must be a worker index or 'all'"
  [[ $INTERVAL =~ ^[0-9]+$ ]] || die "--interval='$INTERVAL' must be a whole number of seconds"
  [[ $MAX_RELAUNCHES =~ ^[0-9]+$ ]] || die "--max-relaunches='$MAX_RELAUNCHES' must be a whole number"
}

tpu_ssh() {  # tpu_ssh WORKER COMMAND: run COMMAND on worker WORKER ('all': on every worker)
  run gcloud compute tpus tpu-vm ssh "$NAME" "${SCOPE[@]}" --worker="$1" --command="$2"
}

create_slice() {
  local extra=()
  if ((SPOT)); then extra+=(--spot); fi
  if ((QUEUED)); then
    # The queued resource and its single node share the name, so tpu-vm ssh works on both kinds.
    run gcloud compute tpus queued-resources create "$NAME" "${SCOPE[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$VERSION" ${extra[@]+"${extra[@]}"}
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${SCOPE[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$VERSION" ${extra[@]+"${extra[@]}"}
  fi
}

delete_slice() {
  if ((QUEUED)); then
    run gcloud compute tpus queued-resources delete "$NAME" "${SCOPE[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${SCOPE[@]}" --quiet
  fi
}

# Prints the slice state (queued resource: ACCEPTED, ACTIVE, SUSPENDED, FAILED, ...; TPU VM:
# CREATING, READY, PREEMPTED, TERMINATED, ...), MISSING (NOT_FOUND) or UNKNOWN (any other
# error: a network blip must not look like a lost slice). A dry run prints the describe
# command and answers $1, so that it can show the path the caller takes on that state.
slice_state() {
  local state cmd err
  if ((QUEUED)); then
    cmd=(gcloud compute tpus queued-resources describe "$NAME" "${SCOPE[@]}"
      --format='value(state.state)')
  else
    cmd=(gcloud compute tpus tpu-vm describe "$NAME" "${SCOPE[@]}" --format='value(state)')
  fi
  if ((DRY_RUN)); then run "${cmd[@]}"; echo "$1"; return; fi
  err=$(mktemp)
  if state=$(run "${cmd[@]}" 2>"$err"); then
    state=${state:-UNKNOWN}
  elif grep -q NOT_FOUND "$err"; then
    state=MISSING
  else
    log "could not describe $NAME: $(tail -n 1 "$err")"
    state=UNKNOWN
  fi
  rm -f "$err"
  echo "$state"
}

# A plain create returns once the slice is READY; a queued resource waits for capacity first.
wait_ready() {
  ((QUEUED)) || return 0
  local state
  while :; do
    state=$(slice_state ACTIVE)
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | MISSING) log "queued resource $NAME is $state"; return 1 ;;
      *) log "queued resource $NAME is $state; waiting ${INTERVAL}s"; sleep "$INTERVAL" ;;
    esac
  done
}

# Copy (the committed HEAD, via git archive) or clone the repo onto every worker, then make a
# venv with the pinned requirements plus jax[tpu] at the same jax version. Idempotent.
install_repo() {
  local jax_version steps fetch tarball
  jax_version=$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' "$ROOT/requirements.txt")
  [[ -n $jax_version ]] || die "no 'jax==VERSION' pin in $ROOT/requirements.txt"
  if [[ -n $REPO ]]; then
    fetch="rm -rf $REMOTE_REPO && git clone --quiet $(shquote "$REPO") $REMOTE_REPO"
    if [[ -n $REF ]]; then fetch+=" && git -C $REMOTE_REPO checkout --quiet $(shquote "$REF")"; fi
  else
    if [[ -n $(git -C "$ROOT" status --porcelain 2>/dev/null) ]]; then
      log "warning: uncommitted changes in $ROOT are not shipped (only the committed HEAD is)"
    fi
    tarball="${TMPDIR:-/tmp}/clusterstm_jax-$NAME.tgz"
    run git -C "$ROOT" archive --format=tar.gz --output="$tarball" HEAD || return 1
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_TARBALL_NAME" "${SCOPE[@]}" \
      --worker=all || return 1
    fetch="rm -rf $REMOTE_REPO && mkdir -p $REMOTE_REPO"
    fetch+=" && tar -xzf \$HOME/$REMOTE_TARBALL_NAME -C $REMOTE_REPO"
  fi
  # jax 0.10 needs Python >= 3.11; Ubuntu 22.04 TPU images ship 3.10, so install 3.11 there.
  # The lock timeout waits out unattended-upgrades, which holds apt on a freshly booted VM.
  # Replacing the code under a live run would break its later imports.
  steps="if $REMOTE_RUNNING; then echo \"a run is active on \$(hostname); not reinstalling\" >&2; exit 1; fi"
  steps+='; if python3 -c "import sys; sys.exit(sys.version_info < (3, 11))"'
  steps+='; then PY=python3; else PY=python3.11; fi'
  steps+=" && sudo apt-get -o DPkg::Lock::Timeout=600 -qq update"
  steps+=" && sudo apt-get -o DPkg::Lock::Timeout=600 -qq install -y \$PY-venv"
  steps+=" && $fetch"
  steps+=" && { [ -x $REMOTE_VENV/bin/python ] || \$PY -m venv $REMOTE_VENV; }"
  steps+=" && $REMOTE_VENV/bin/pip install -q --upgrade pip"
  steps+=" && $REMOTE_VENV/bin/pip install -q -r $REMOTE_REPO/requirements.txt"
  steps+=" \"jax[tpu]==$jax_version\" -f $(shquote "$LIBTPU_FIND_LINKS")"
  steps+=" -r $REMOTE_REPO/requirements-gcs.txt"  # gs:// workdirs: the [gcs] extra
  tpu_ssh all "$steps"
}

# Start the config on every worker at once, detached (survives the ssh session), appending to a
# log; the exit status lands in a file so `train_status` can tell finished from killed. The same
# command resumes a run: train.py restores the workdir's latest checkpoint by itself.
# --distributed: jax.distributed.initialize() finds the other hosts of the slice by itself.
start_train() {
  local args cmd
  args=$(quote_cmd -m clusterstm_jax.train --config="$CONFIG" --workdir="$WORKDIR" --distributed \
    ${OVERRIDES[@]+"${OVERRIDES[@]}"})
  cmd="cd $REMOTE_REPO || exit 1"
  cmd+="; if $REMOTE_RUNNING; then echo \"a run is already active on \$(hostname)\" >&2; exit 1; fi"
  cmd+="; rm -f $REMOTE_EXIT"
  cmd+="; (trap \"\" HUP; PYTHONUNBUFFERED=1 $REMOTE_VENV/bin/python $args; echo \$? > $REMOTE_EXIT)"
  cmd+=" >> $REMOTE_LOG 2>&1 < /dev/null & echo \$! > $REMOTE_PID"
  tpu_ssh all "$cmd"
}

# Prints exited:CODE | running | none (never started here) | unknown (worker 0 unreachable).
# The exit file is checked first: start_train removes it, and it is written just before the
# run's process ends.
train_status() {
  local cmd out
  cmd="if [ -f $REMOTE_EXIT ]; then echo \"exited:\$(cat $REMOTE_EXIT)\""
  cmd+="; elif $REMOTE_RUNNING; then echo running"
  cmd+="; else echo none; fi"
  out=$(tpu_ssh 0 "$cmd") || out=unknown
  echo "${out##*$'\n'}"
}

# Follow worker WORKER's log; tail -F keeps following across restarts of the run.
stream_logs() {
  tpu_ssh "$WORKER" "tail -n 200 -F $REMOTE_LOG"
}
