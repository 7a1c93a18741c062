#!/usr/bin/env bash
# Installs what the tests need, then runs every test of the workspace:
# unit tests, an in-process server, real `thaw serve` processes, real FUSE mounts
# and guests under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The test build takes about 3 GiB, and the tests write up to a few GiB of
# temporary files at once (images, guests' memory): say so up front when
# the disk is short, rather than failing half-way with ENOSPC.
for dir in . "${TMPDIR:-/tmp}"; do
  free_gib=$(df -Pk "$dir" | awk 'NR == 2 { print int($4 / 1048576) }')
  echo "free space under $dir: ${free_gib} GiB" >&2
  [ "$free_gib" -ge 6 ] || echo "warning: under 6 GiB free under $dir: the build or the tests may run out of space" >&2
done
# setup.sh installed what guests need: a guest test that cannot find it fails.
export THAW_REQUIRE_GUEST=1
# And Garage, unless its build failed or was skipped: then the S3 runs skip.
if [ -x "${THAW_GARAGE_DIR:-/var/cache/thaw/garage}/bin/garage" ]; then
  export THAW_REQUIRE_S3=1
fi
cargo test --workspace --locked "$@"
