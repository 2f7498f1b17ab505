# Sourced by the cross/ scripts: where the cache lives and how aarch64 binaries get run.
# shellcheck shell=bash

CROSS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$CROSS_DIR")
CACHE_DIR=${EDGEFLEET_CROSS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/edgefleet/cross}
#: The host Python that downloads wheels and builds ours (the project venv by default).
HOST_PYTHON=${EDGEFLEET_HOST_PYTHON:-$REPO_DIR/.venv/bin/python}
#: Where the device venv lives inside the rootfs; a real Pi uses the same path.
DEVICE_VENV=/opt/edgefleet/venv
SUITE=bookworm

die() { echo "cross: $*" >&2; exit 1; }
log() { echo "cross: $*" >&2; }

need_root() {
  [[ $(id -u) -eq 0 ]] || die "must run as root (binfmt_misc, chroot and mounts need it)"
}

# Make the kernel run aarch64 ELF binaries through qemu-aarch64-static.
# The F flag makes the kernel open the interpreter now, so it also works inside a chroot
# that has no copy of qemu. Debian's qemu-user-static ships the entry in binfmt.d;
# without it we write the same register string ourselves.
ensure_binfmt() {
  local misc=/proc/sys/fs/binfmt_misc
  if [[ ! -e $misc/register ]]; then
    mount -t binfmt_misc binfmt_misc "$misc" 2>/dev/null \
      || die "cannot mount binfmt_misc at $misc (a container without CAP_SYS_ADMIN?)"
  fi
  local entry=$misc/qemu-aarch64
  if [[ ! -e $entry ]]; then
    local qemu conf=/usr/lib/binfmt.d/qemu-aarch64.conf
    qemu=$(command -v qemu-aarch64-static) || die "qemu-aarch64-static is missing (apt-get install qemu-user-static)"
    if [[ -r $conf ]]; then
      grep -v '^#' "$conf" > "$misc/register"
    else
      printf '%s' ':qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$qemu"':F' \
        > "$misc/register"
    fi
  fi
  grep -q '^enabled' "$entry" || echo 1 > "$entry"
  grep -q '^enabled' "$misc/status" || echo 1 > "$misc/status"
  grep -q '^flags:.*F' "$entry" \
    || log "warning: qemu-aarch64 is registered without the F flag; chroots need qemu inside"
}
