#!/usr/bin/env bash
# Installs what thaw's mounts and tests need on a Debian machine, if missing:
# FUSE and the comparison tools, then what the VM tests boot guests with
# (QEMU >= 8.2, a static busybox, virtiofsd, a Debian cloud kernel).
# Everything is checked first, so a run on a ready machine touches no network.
set -euo pipefail

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_updated=""
apt_update() {
  [ -n "$apt_updated" ] && return
  $sudo apt-get update -qq
  apt_updated=1
}
apt_install() { # [apt-get install options...] packages...
  echo "installing: $*" >&2
  apt_update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v mksquashfs >/dev/null 2>&1 || need+=(squashfs-tools)
command -v squashfuse >/dev/null 2>&1 || need+=(squashfuse)
command -v casync >/dev/null 2>&1 || need+=(casync)
[ ${#need[@]} -eq 0 ] || apt_install "${need[@]}"
[ -e /dev/fuse ] || { echo "/dev/fuse is missing: FUSE mounts cannot work here" >&2; exit 1; }

# --- Guests under QEMU (testkit's `guest` module) ---
# Kept in one cache directory per machine; THAW_GUEST_DIR moves it (the
# testkit reads it too).

# QEMU migrates a vhost-user-fs device only from 8.2 on; bookworm has 7.2,
# bookworm-backports has 10.x.
qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  local v
  v=$(qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 8 ] || { [ "$1" -eq 8 ] && [ "$2" -ge 2 ]; }
}

# Adds <codename>-backports for the Debian mirror the machine already uses.
enable_backports() {
  local codename=$1 list=/etc/apt/sources.list.d/thaw-backports.list mirror f sources=()
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && sources+=("$f")
  done
  grep -qs "^[^#]*${codename}-backports" "${sources[@]}" && return
  mirror=$(awk -v c="$codename" '
      /^URIs:/ { uri = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == c) { print uri; exit } }
      /^deb / { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == c) { print $i; exit } }' "${sources[@]}")
  [ -n "$mirror" ] || { echo "no apt source for $codename found: cannot add ${codename}-backports" >&2; exit 1; }
  echo "adding apt source: $mirror ${codename}-backports main ($list)" >&2
  echo "deb $mirror ${codename}-backports main" | $sudo tee "$list" >/dev/null
  apt_updated=""
}

guest=${THAW_GUEST_DIR:-/var/cache/thaw/guest}
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
from=()
if [ "$codename" = bookworm ]; then from=(-t bookworm-backports); fi

need=()
qemu_ok || need+=(qemu-system-x86)
dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need+=(busybox-static)
if [ ${#need[@]} -gt 0 ]; then
  [ ${#from[@]} -eq 0 ] || enable_backports "$codename"
  apt_install "${from[@]}" --no-install-recommends "${need[@]}"
  qemu_ok || { echo "qemu-system-x86_64 is older than 8.2 even after installing" >&2; exit 1; }
fi

# virtiofsd, the reference virtio-fs backend: Debian packages it from trixie
# on; where apt has none (bookworm, backports included), it is built from
# crates.io into the guest cache.
if [ ! -x /usr/libexec/virtiofsd ] && [ ! -x "$guest/bin/virtiofsd" ]; then
  apt_update
  if apt-cache show virtiofsd >/dev/null 2>&1; then
    apt_install "${from[@]}" --no-install-recommends virtiofsd
  else
    apt_install libseccomp-dev libcap-ng-dev
    echo "building virtiofsd from crates.io into $guest/bin (a few minutes)" >&2
    tmp=$(mktemp -d)
    CARGO_TARGET_DIR="$tmp" cargo install --quiet --locked virtiofsd --root "$tmp/root"
    $sudo mkdir -p "$guest/bin"
    $sudo install -m 755 "$tmp/root/bin/virtiofsd" "$guest/bin/virtiofsd"
    rm -rf "$tmp"
  fi
fi

# A Debian cloud kernel (virtio drivers, small) and its modules, unpacked once
# per machine.
if [ ! -e "$guest/vmlinuz" ] || [ ! -d "$guest/modules" ]; then
  apt_update
  pkg=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-[0-9].*-cloud-amd64\)$/\1/p' | head -n1)
  [ -n "$pkg" ] || { echo "cannot resolve linux-image-cloud-amd64 to a kernel package" >&2; exit 1; }
  echo "fetching guest kernel: $pkg into $guest" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  chown _apt "$tmp" 2>/dev/null || true # as root, apt downloads as its own user
  (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null)
  $sudo mkdir -p "$guest"
  $sudo rm -rf "$guest/root"
  $sudo dpkg-deb -x "$tmp"/*.deb "$guest/root"
  kver=$(ls "$guest/root/lib/modules")
  $sudo ln -sfn "root/boot/vmlinuz-$kver" "$guest/vmlinuz"
  $sudo ln -sfn "root/lib/modules/$kver" "$guest/modules"
  # Everyone may boot it: the kernel image is root-only once unpacked.
  $sudo chmod -R a+rX "$guest"
fi

# --- Garage, the S3 store of the store suite's S3 runs (tests/backends.rs) ---
# Built from crates.io once per machine (about 10-15 minutes on two cores).
# A failed build does not stop the tests: their S3 runs then say SKIP.
# THAW_NO_GARAGE=1 skips it.
if [ "${THAW_NO_GARAGE:-0}" = 0 ]; then
  "$(dirname "$0")/garage.sh" install ||
    echo "warning: Garage could not be built: the S3 runs of tests/backends.rs will skip" >&2
fi
