#!/usr/bin/env bash
# Start a config on every worker of a slice, detached, logging to ~/clusterstm_train.log on
# each worker. Run it again with the same --workdir to resume from its latest checkpoint.
#
#   launch/train.sh --name=NAME --zone=ZONE --workdir=gs://BUCKET/RUN [--project=PROJECT]
#                   [--config=configs/pretrain.py:paper] [--config.x=y ...] [--dry-run]
#
# --config.x=y overrides are passed to clusterstm_jax.train unchanged (quoted for the remote
# shell), e.g. --config.total_steps=1000 '--config.mesh.fsdp=-1'.

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "name zone project workdir config overrides" "$@"
require name zone workdir config
start_train
