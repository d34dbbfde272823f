#!/usr/bin/env bash
# Install the repository and its pinned requirements (plus jax[tpu] at the same jax version)
# on every worker of a slice: the committed HEAD of this checkout is copied over with
# git archive, or --repo is cloned on each worker. Safe to run again (reuses the venv).
#
#   launch/install.sh --name=NAME --zone=ZONE [--project=PROJECT]
#                     [--repo=GIT_URL [--ref=COMMIT_OR_BRANCH]] [--dry-run]
#
# The libtpu wheel index is $LIBTPU_FIND_LINKS (export it to use another).

set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "name zone project repo ref" "$@"
require name zone
install_repo
