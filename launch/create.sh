#!/usr/bin/env bash
# Create a TPU VM slice (plain create, or a queued resource with --queued, which waits for
# capacity and then until the slice is ACTIVE).
#
#   launch/create.sh --name=NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME
#                    [--project=PROJECT] [--queued] [--spot] [--interval=SECONDS] [--dry-run]
#
# --accelerator-type  e.g. v4-32, v5p-32, v5litepod-16, v6e-8
# --version           the TPU runtime, e.g. tpu-ubuntu2204-base (v4, v5p), v2-alpha-tpuv5-lite
#                     (v5e), v2-alpha-tpuv6e (v6e)
# --spot              spot capacity: cheaper, preemptible (pair it with launch/watch.sh)
# --interval          seconds between state checks while a queued resource waits (default 120)
# --dry-run           print the commands ('+ ' prefixed), run nothing

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "name zone project accelerator-type version queued spot interval" "$@"
require name zone accelerator-type version
create_slice
wait_ready
