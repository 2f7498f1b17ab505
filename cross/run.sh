#!/usr/bin/env bash
# Run a command inside the emulated arm64 device (the cached Debian bookworm rootfs).
#
#   cross/run.sh [options] -- COMMAND [ARG...]
#     --rootfs DIR          the root filesystem (default: the one cross/build_rootfs.sh built last)
#     --state DIR           keep the device's writes in DIR (an overlay upper layer), so each
#                           emulated device has its own disk; without it writes vanish on exit
#     --writable            write to the rootfs itself (only the build does this)
#     --bind HOST:GUEST     bind-mount a host path into the device (read-write)
#     --ro-bind HOST:GUEST  the same, read-only
#     --env NAME=VALUE      set an environment variable (the device starts with a clean one)
#     --chdir DIR           working directory inside the device (default /root)
#     --hostname NAME       the device's host name (its own UTS namespace)
#     --cpu MODEL           the emulated CPU (default cortex-a72, a Raspberry Pi 4; cortex-a76
#                           is a Pi 5). Not QEMU's "max": see docs/arm64.md
#
# Examples:
#   cross/run.sh -- uname -m                                  # aarch64
#   cross/run.sh --state /tmp/pi1 --hostname pi1 -- edgefleet-agent --help
#   cross/run.sh --ro-bind out/digits:/pkg -- python -c 'import platform; print(platform.machine())'
#
# Every mount lives in a private mount namespace that the kernel drops when the command exits,
# so concurrent devices never see each other's mounts and nothing stays mounted. The network
# is the host's: a device reaches a broker or SuperLink on 127.0.0.1. Signals sent to this
# script reach the command, because the script ends by exec-ing it (one process throughout).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

orig_args=("$@")
rootfs="" state="" writable=0 hostname="" chdir=/root cpu=${EDGEFLEET_CROSS_CPU:-cortex-a72}
binds=() envs=()
while (($#)); do
  case $1 in
    --rootfs) rootfs=$2; shift 2 ;;
    --state) state=$2; shift 2 ;;
    --writable) writable=1; shift ;;
    --bind) binds+=("rw:$2"); shift 2 ;;
    --ro-bind) binds+=("ro:$2"); shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --chdir) chdir=$2; shift 2 ;;
    --hostname) hostname=$2; shift 2 ;;
    --cpu) cpu=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
(($#)) || die "no command given (cross/run.sh [options] -- COMMAND)"
need_root

if [[ -z ${_EDGEFLEET_CROSS_NS:-} ]]; then
  ensure_binfmt
  # Start again in fresh mount and UTS namespaces; exec keeps it one process.
  export _EDGEFLEET_CROSS_NS=1
  exec unshare --mount --uts --propagation private -- "$0" "${orig_args[@]}"
fi
unset _EDGEFLEET_CROSS_NS

if [[ -z $rootfs ]]; then
  [[ -e $CACHE_DIR/current ]] || die "no rootfs built yet: run cross/build_rootfs.sh"
  rootfs=$CACHE_DIR/current
fi
rootfs=$(readlink -f "$rootfs")
[[ -x $rootfs/usr/bin/python3 ]] || die "$rootfs is not a built rootfs"

if ((writable)); then
  root=$rootfs
else
  # An overlay keeps the shared cached rootfs pristine. Mount points are per namespace,
  # so every device can use the same two (empty) directories at once.
  mnt=$CACHE_DIR/mnt
  mkdir -p "$mnt/scratch" "$mnt/root"
  if [[ -n $state ]]; then
    mkdir -p "$state/upper" "$state/work"
    upper=$(readlink -f "$state/upper") work=$(readlink -f "$state/work")
  else
    mount -t tmpfs -o mode=0755 edgefleet-scratch "$mnt/scratch"
    mkdir -p "$mnt/scratch/upper" "$mnt/scratch/work"
    upper=$mnt/scratch/upper work=$mnt/scratch/work
  fi
  root=$mnt/root
  mount -t overlay edgefleet-device -o "lowerdir=$rootfs,upperdir=$upper,workdir=$work" "$root"
fi

mount -t proc proc "$root/proc"
# qemu-user 7.2 (bookworm) passes the host's x86 /proc/cpuinfo through, and onnxruntime's
# CPU detection (pytorch/cpuinfo) segfaults parsing it on aarch64: show a Raspberry Pi 4's.
mount --bind "$CROSS_DIR/cpuinfo-rpi4" "$root/proc/cpuinfo"
mount --rbind /dev "$root/dev"        # /dev/pts too: a device reads frames from a host pty
mount --rbind -o ro /sys "$root/sys" 2>/dev/null || mount --rbind /sys "$root/sys"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
for spec in "${binds[@]}"; do
  mode=${spec%%:*} rest=${spec#*:}
  src=${rest%%:*} dst=${rest#*:}
  [[ -n $src && -n $dst && $dst == /* ]] || die "bad bind $rest (want HOST:/GUEST)"
  [[ -e $src ]] || die "bind source $src does not exist"
  src=$(readlink -f "$src")
  if [[ -d $src ]]; then mkdir -p "$root$dst"; else mkdir -p "$(dirname "$root$dst")"; touch "$root$dst"; fi
  mount --bind "$src" "$root$dst"
  [[ $mode == rw ]] || mount -o remount,bind,ro "$root$dst"
done
[[ -z $hostname ]] || hostname "$hostname"

exec chroot "$root" /usr/bin/env -i -C "$chdir" HOME=/root LANG=C.UTF-8 \
  PATH="$DEVICE_VENV/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  QEMU_CPU="$cpu" ${TERM:+TERM=$TERM} "${envs[@]}" "$@"
