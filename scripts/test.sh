#!/usr/bin/env bash
# Installs what the tests need, then runs every test of the workspace:
# unit tests, an in-process server, real `thaw serve` processes, real FUSE mounts
# and guests under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# setup.sh installed what guests need: a guest test that cannot find it fails.
export THAW_REQUIRE_GUEST=1
cargo test --workspace --locked "$@"
