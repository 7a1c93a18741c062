#!/usr/bin/env bash
# The S3 figure of docs/benchmarks.md: push, export and a cold mount read of
# one tree, over a directory store and over a three-node Garage cluster on
# loopback (scripts/garage.sh), in one run.
#   scripts/s3-figure.sh DIR     (a real tree: a pip-installed site-packages, say)
set -euo pipefail
src=${1:?a directory to push}
thaw=${THAW:-target/release/thaw}
work=$(mktemp -d /var/tmp/thaw-s3-figure.XXXXXX)
pids=()
cleanup() {
  for m in "$work"/mnt-*; do [ -d "$m" ] && "$thaw" umount "$m" >/dev/null 2>&1 || true; done
  kill "${pids[@]}" 2>/dev/null || true
  scripts/garage.sh stop "$work/garage"
  rm -rf "$work"
}
trap cleanup EXIT
scripts/garage.sh start "$work/garage" >/dev/null
set -a; . "$work/garage/env"; set +a
bytes=$(du -sb "$src" | cut -f1)
mib() { echo "scale=1; $bytes / 1048576 / $1" | bc; }
echo "tree: $src, $(echo "scale=1; $bytes / 1048576" | bc) MiB, $(find "$src" -type f | wc -l) files"
printf '%-8s %12s %12s %16s\n' store "push MiB/s" "export MiB/s" "mount read MiB/s"
for store in file s3; do
  port=$((20000 + RANDOM % 20000))
  case $store in
    file) url="file://$work/store" ;;
    s3) url="$THAW_S3_STORE/figure" ;;
  esac
  "$thaw" serve --listen 127.0.0.1:$port --store "$url" >"$work/serve-$store.log" 2>&1 &
  pids+=($!)
  sleep 1
  r=127.0.0.1:$port/env:v1
  t0=$(date +%s.%N); "$thaw" push "$src" "$r" >/dev/null; t1=$(date +%s.%N)
  "$thaw" export "$r" "$work/out-$store" >/dev/null
  t2=$(date +%s.%N)
  mkdir -p "$work/mnt-$store"
  "$thaw" mount "$r" "$work/mnt-$store" --cache-dir "$work/cache-$store" >/dev/null
  t3=$(date +%s.%N)
  tar -cf - -C "$work/mnt-$store" . | cat >/dev/null
  t4=$(date +%s.%N)
  printf '%-8s %12s %12s %16s\n' "$store" "$(mib "$(echo "$t1 - $t0" | bc)")" \
    "$(mib "$(echo "$t2 - $t1" | bc)")" "$(mib "$(echo "$t4 - $t3" | bc)")"
done
