#!/usr/bin/env bash
# Installs what the tests need, then runs every test of the workspace:
# unit tests, an in-process server, real `thaw serve` processes and real FUSE mounts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --locked "$@"
