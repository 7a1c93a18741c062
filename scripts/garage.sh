#!/usr/bin/env bash
# Garage, an S3-compatible distributed object store, for the tests' S3 runs.
#   scripts/garage.sh install     builds it once per machine (about 10-15 min)
#                                  into $THAW_GARAGE_DIR (/var/cache/thaw/garage)
#   scripts/garage.sh start DIR   a three-node cluster on loopback with its data
#                                  in DIR; prints the AWS_* variables and the
#                                  store URL for thaw, one KEY=VALUE per line
#   scripts/garage.sh stop DIR    ends that cluster
set -euo pipefail
root=${THAW_GARAGE_DIR:-/var/cache/thaw/garage}
version=2.5.0
garage=$root/bin/garage

install() {
  if [ -x "$garage" ] && "$garage" --version 2>/dev/null | grep -q "$version"; then
    return
  fi
  echo "building Garage $version from crates.io into $root (once per machine)" >&2
  mkdir -p "$root"
  cargo install garage --version "$version" --locked --root "$root" --quiet
}

# One attempt at a cluster on ports from $2 up; fails (nodes stopped) if a
# node does not come up, say because a port was taken meanwhile.
try_start() {
  local dir=$1 base=$2 secret
  secret=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
  for i in 1 2 3; do
    local n=$dir/node$i p=$((base + 10 * i))
    rm -rf "$n"
    mkdir -p "$n"
    cat >"$n/garage.toml" <<TOML
metadata_dir = "$n/meta"
data_dir = "$n/data"
db_engine = "sqlite"
replication_factor = 3
rpc_secret = "$secret"
rpc_bind_addr = "127.0.0.1:$((p + 1))"
rpc_public_addr = "127.0.0.1:$((p + 1))"
[s3_api]
api_bind_addr = "127.0.0.1:$p"
s3_region = "garage"
[admin]
api_bind_addr = "127.0.0.1:$((p + 2))"
TOML
    chmod 600 "$n/garage.toml"
    "$garage" -c "$n/garage.toml" server >"$n/log" 2>&1 &
    echo $! >>"$dir/pids"
  done
  local g1=("$garage" -c "$dir/node1/garage.toml") id up=
  for _ in $(seq 100); do "${g1[@]}" status >/dev/null 2>&1 && { up=1; break; }; sleep 0.1; done
  [ -n "$up" ] || return 1
  for i in 2 3; do
    id=$("$garage" -c "$dir/node$i/garage.toml" node id -q 2>/dev/null) || return 1
    "${g1[@]}" node connect "$id" >/dev/null || return 1
  done
  for i in 1 2 3; do
    id=$("$garage" -c "$dir/node$i/garage.toml" node id -q 2>/dev/null) || return 1
    "${g1[@]}" layout assign -z dc1 -c 1G "${id%%@*}" >/dev/null || return 1
  done
  "${g1[@]}" layout apply --version 1 >/dev/null || return 1
  "${g1[@]}" bucket create thaw >/dev/null || return 1
  local key
  key=$("${g1[@]}" key create thaw-key) || return 1
  "${g1[@]}" bucket allow --read --write --owner thaw --key thaw-key >/dev/null || return 1
  {
    echo "AWS_ACCESS_KEY_ID=$(sed -n 's/^Key ID: *//p' <<<"$key")"
    echo "AWS_SECRET_ACCESS_KEY=$(sed -n 's/^Secret key: *//p' <<<"$key")"
    echo "AWS_REGION=garage"
    echo "AWS_ENDPOINT=http://127.0.0.1:$((base + 10))"
    echo "AWS_ALLOW_HTTP=true"
    echo "THAW_S3_STORE=s3://thaw"
  } >"$dir/env"
}

start() {
  local dir=$1 attempt base
  [ -x "$garage" ] || { echo "no Garage at $garage: run scripts/garage.sh install" >&2; exit 1; }
  mkdir -p "$dir"
  # Ports below the kernel's ephemeral range (32768 and up by default), where
  # the other tests' servers and every outgoing connection take theirs; a
  # start that still meets a taken port is retried on others.
  for attempt in 1 2 3; do
    base=$((20000 + RANDOM % 12000))
    if try_start "$dir" "$base"; then
      cat "$dir/env"
      return 0
    fi
    echo "Garage did not come up on ports $((base + 10))-$((base + 32)) (attempt $attempt):" >&2
    tail -n 3 "$dir"/node*/log >&2 || true
    stop "$dir"
  done
  exit 1
}

stop() {
  local dir=$1 pid
  [ -f "$dir/pids" ] || return 0
  xargs -r kill <"$dir/pids" 2>/dev/null || true
  # Wait for the nodes to be gone, so that nothing of theirs still writes
  # into the directory (a retried start reuses it).
  while read -r pid; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done <"$dir/pids"
  rm -f "$dir/pids"
}

case "${1:-}" in
  install) install ;;
  start) start "${2:?a directory}" ;;
  stop) stop "${2:?a directory}" ;;
  *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
