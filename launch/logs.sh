#!/usr/bin/env bash
# Stream the training log of one worker (worker 0 by default) until Ctrl-C.
#
#   launch/logs.sh --name=NAME --zone=ZONE [--project=PROJECT] [--worker=N] [--dry-run]

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "name zone project worker" "$@"
require name zone
stream_logs
