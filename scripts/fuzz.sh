#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) each and keeps what it
# finds: the corpus in fuzz/corpus/<target> (committed), crashes in
# fuzz/artifacts/<target>. Needs cargo-fuzz (`cargo install cargo-fuzz`); the
# stable toolchain is asked for nightly features with RUSTC_BOOTSTRAP=1.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
export RUSTC_BOOTSTRAP=1
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t"
  echo "fuzzing $t for ${seconds}s" >&2
  cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$seconds" -max_len=1048576 -rss_limit_mb=4096
done
