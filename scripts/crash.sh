#!/usr/bin/env bash
# Crash consistency at length: the `crash` test (tests/crash.rs) for RUNS
# rounds (default 200), in release. Each round kills `thaw push` or
# `thaw serve` with SIGKILL at a random point of a push and checks the store
# after (the tag, an export, fsck, staging files, a re-push). It prints the
# seed: pass it back as SEED to replay a failing run.
# Usage: scripts/crash.sh [RUNS] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
export THAW_CRASH_RUNS="${1:-200}"
if [ -n "${2:-}" ]; then
  export THAW_CRASH_SEED="$2"
fi
cargo test --release --locked -p thaw --test crash -- --nocapture
