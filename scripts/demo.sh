#!/usr/bin/env bash
# Runs `thaw demo`: an embedded server on a temporary local store, a generated
# image pushed, mounted and partly read, with what was fetched and how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo run --release -q -p thaw -- demo "$@"
