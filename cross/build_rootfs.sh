#!/usr/bin/env bash
# Build (or reuse) the emulated device: a Debian bookworm arm64 root filesystem whose venv
# holds edgefleet[device] installed from aarch64 wheels, as on a Raspberry Pi.
#
#   cross/build_rootfs.sh              build what is missing, print the rootfs path
#   cross/build_rootfs.sh --key        print the cache key of the base layer and exit
#   cross/build_rootfs.sh --rebuild    throw the cached rootfs away and build it again
#
# Two layers, so that editing the code does not mean a new Debian:
#   base      debootstrap (python3, python3-venv) + a venv with every third-party dependency
#             of edgefleet[device]; cached as rootfs-<key>, where <key> hashes these scripts
#             and the dependency list read from pyproject.toml. Cold: a few minutes.
#   edgefleet our wheel, built from this checkout (pip wheel --no-deps) and reinstalled
#             whenever a source file changed (hash stamped in the rootfs). Seconds.
# Wheels come from the package index via `pip download --platform manylinux_*_aarch64`
# on the host; the device itself installs with --no-index (a Pi needs no compiler).
# The cache lives in $EDGEFLEET_CROSS_CACHE or ${XDG_CACHE_HOME:-~/.cache}/edgefleet/cross.
# Needs root, debootstrap and qemu-user-static (scripts/install-system-deps.sh all).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

mode=build
case ${1:-} in
  "") ;;
  --key) mode=key ;;
  --rebuild) mode=rebuild ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown option $1 (see --help)" ;;
esac

# bookworm has glibc 2.36: every manylinux_2_X with X <= 36 runs there.
platform_args() {
  echo --platform manylinux2014_aarch64
  for minor in $(seq 17 36); do echo --platform "manylinux_2_${minor}_aarch64"; done
}

# Third-party requirements of edgefleet[device], read from pyproject.toml.
device_requirements() {
  "$HOST_PYTHON" - "$REPO_DIR/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["device"]
print("\n".join(r for r in reqs if not r.startswith("edgefleet")))
PY
}

base_key() {
  { cat "$CROSS_DIR/common.sh" "$CROSS_DIR/build_rootfs.sh"; device_requirements
    echo "$SUITE arm64 cp311"; } | sha256sum | cut -c1-16
}

source_hash() {
  (cd "$REPO_DIR" && find pyproject.toml README.md device models server -type f \
      -not -path '*/__pycache__/*' -not -name '*.pyc' | LC_ALL=C sort | xargs sha256sum) \
    | sha256sum | cut -c1-16
}

# Refuse to delete a directory that still has something mounted inside it.
remove_tree() {
  local dir=$1
  [[ -e $dir ]] || return 0
  if grep -q " $(readlink -f "$dir")/" /proc/self/mounts; then
    die "$dir has mounts inside; not removing it"
  fi
  rm -rf "$dir"
}

build_base() {
  local final=$1 tmp=$1.partial wheels=$CACHE_DIR/wheels-$key t0=$SECONDS
  remove_tree "$tmp"
  log "debootstrap $SUITE arm64 into $tmp"
  mkdir -p "$CACHE_DIR/debs"
  unshare --mount --propagation private -- debootstrap --arch arm64 --variant=minbase \
    --include=python3,python3-venv --cache-dir="$CACHE_DIR/debs" "$SUITE" "$tmp" >&2 \
    || die "debootstrap failed (see above)"
  printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > "$tmp/etc/hosts"
  rm -rf "$tmp/var/cache/apt/archives/"*.deb "$tmp/var/lib/apt/lists/"*
  log "debootstrap took $((SECONDS - t0)) s"

  t0=$SECONDS
  device_requirements > "$CACHE_DIR/requirements-$key.txt"
  log "downloading aarch64 wheels for: $(tr '\n' ' ' < "$CACHE_DIR/requirements-$key.txt")"
  mkdir -p "$wheels"
  # shellcheck disable=SC2046
  "$HOST_PYTHON" -m pip download -q --disable-pip-version-check -d "$wheels" \
    --only-binary=:all: --python-version 3.11 --implementation cp $(platform_args) \
    -r "$CACHE_DIR/requirements-$key.txt" >&2 \
    || die "pip download failed: some requirement has no aarch64 cp311 wheel (see above)"
  log "wheel download took $((SECONDS - t0)) s ($(find "$wheels" -name '*.whl' | wc -l) wheels)"

  t0=$SECONDS
  "$CROSS_DIR/run.sh" --rootfs "$tmp" --writable --ro-bind "$wheels:/mnt/wheels" \
    --ro-bind "$CACHE_DIR/requirements-$key.txt:/mnt/requirements.txt" -- sh -euc "
      python3 -m venv $DEVICE_VENV
      $DEVICE_VENV/bin/pip install -q --no-cache-dir --disable-pip-version-check \
        --no-index --find-links /mnt/wheels -r /mnt/requirements.txt
      $DEVICE_VENV/bin/pip check" >&2 || die "installing the wheels inside the rootfs failed"
  rmdir "$tmp/mnt/wheels" 2>/dev/null || true
  rm -f "$tmp/mnt/requirements.txt"
  log "venv install under emulation took $((SECONDS - t0)) s"
  touch "$tmp/.edgefleet-base"
  mv "$tmp" "$final"
}

install_edgefleet() {
  local root=$1 want stamp=$1/opt/edgefleet/SOURCE_HASH work t0=$SECONDS
  want=$(source_hash)
  [[ -r $stamp && $(cat "$stamp") == "$want" ]] && return 0
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  mkdir "$work/src" "$work/dist"
  tar -C "$REPO_DIR" --exclude=__pycache__ --exclude='*.pyc' \
    -c pyproject.toml README.md device models server | tar -C "$work/src" -x
  "$HOST_PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$work/dist" "$work/src" >&2 || die "building the edgefleet wheel failed"
  "$CROSS_DIR/run.sh" --rootfs "$root" --writable --ro-bind "$work/dist:/mnt/dist" -- sh -euc "
    $DEVICE_VENV/bin/pip install -q --no-cache-dir --disable-pip-version-check \
      --no-index --no-deps --force-reinstall /mnt/dist/*.whl" >&2 \
    || die "installing the edgefleet wheel inside the rootfs failed"
  rmdir "$root/mnt/dist" 2>/dev/null || true
  echo "$want" > "$stamp"
  log "installed edgefleet ($want) in $((SECONDS - t0)) s"
}

key=$(base_key)
if [[ $mode == key ]]; then echo "$key"; exit 0; fi
need_root
command -v debootstrap >/dev/null || [[ -x /usr/sbin/debootstrap ]] \
  || die "debootstrap is missing (scripts/install-system-deps.sh all)"
[[ -x $HOST_PYTHON ]] || die "host python $HOST_PYTHON is missing (make venv)"
export PATH=$PATH:/usr/sbin:/sbin
ensure_binfmt
mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/lock"
flock 9    # one builder at a time; concurrent callers wait and then reuse its result

base=$CACHE_DIR/rootfs-$key
[[ $mode == rebuild ]] && remove_tree "$base"
[[ -e $base/.edgefleet-base ]] || build_base "$base"
install_edgefleet "$base"
ln -sfn "rootfs-$key" "$CACHE_DIR/current"
for old in "$CACHE_DIR"/rootfs-* "$CACHE_DIR"/wheels-* "$CACHE_DIR"/requirements-*; do
  case $old in *"$key"*) ;; *) log "removing stale $old"; remove_tree "$old" ;; esac
done
echo "$base"
