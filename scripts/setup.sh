#!/usr/bin/env bash
# Installs what thaw's mounts and tests need on a Debian machine, if missing.
set -euo pipefail
need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v mksquashfs >/dev/null 2>&1 || need+=(squashfs-tools)
command -v squashfuse >/dev/null 2>&1 || need+=(squashfuse)
command -v casync >/dev/null 2>&1 || need+=(casync)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -e /dev/fuse ] || { echo "/dev/fuse is missing: FUSE mounts cannot work here" >&2; exit 1; }
