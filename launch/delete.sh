#!/usr/bin/env bash
# Delete a slice (with --queued: the queued resource and its node). The workdir on GCS stays.
#
#   launch/delete.sh --name=NAME --zone=ZONE [--project=PROJECT] [--queued] [--dry-run]

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "name zone project queued" "$@"
require name zone
delete_slice
