#!/usr/bin/env bash
# The garbage collection figure of docs/benchmarks.md: a store holding many
# versions of many images, then one collection (dry run, the run itself, and
# the next run, which empties the trash), then an export of every image.
#   scripts/gc-figure.sh [VERSIONS] [IMAGES]   (default 2000 versions of 20 images)
set -euo pipefail
versions=${1:-2000}
images=${2:-20}
thaw=${THAW:-target/release/thaw}
work=$(mktemp -d /var/tmp/thaw-gc-figure.XXXXXX)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
port=$((20000 + RANDOM % 20000))
"$thaw" serve --listen 127.0.0.1:$port --store "$work/store" >"$work/serve.log" 2>&1 &
server=$!
sleep 1
mkdir -p "$work/src/lib"
head -c $((4 << 20)) /dev/urandom >"$work/src/lib/base.bin"   # shared by every version
start=$(date +%s.%N)
for i in $(seq 1 "$versions"); do
  head -c $((1 << 20)) /dev/urandom >"$work/src/own.bin"      # 16 chunks of its own
  for j in $(seq 1 20); do echo "v$i f$j" >"$work/src/lib/f$j.py"; done
  "$thaw" push "$work/src" "127.0.0.1:$port/img$((i % images)):latest" --chunk-size 65536 >/dev/null
done
echo "pushed $versions versions of $images images in $(echo "$(date +%s.%N) - $start" | bc) s"
echo "store: $(du -sh "$work/store" | cut -f1), $(find "$work/store" -type f | wc -l) objects"
"$thaw" gc --store "$work/store" --grace 0 --dry-run
/usr/bin/time -f "collection: %e s, peak RSS %M KiB" "$thaw" gc --store "$work/store" --grace 0
/usr/bin/time -f "next collection (empties the trash): %e s, peak RSS %M KiB" "$thaw" gc --store "$work/store" --grace 0
for i in $(seq 0 $((images - 1))); do
  "$thaw" export "127.0.0.1:$port/img$i:latest" "$work/out$i" >/dev/null
done
echo "$images exports after the collection: all whole"
