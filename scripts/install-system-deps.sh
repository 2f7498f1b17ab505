#!/usr/bin/env bash
# Install the Debian packages edgefleet's tests and demo need, only when missing.
#   install-system-deps.sh python   just what a venv needs
#   install-system-deps.sh all      also mosquitto, socat, qemu-user-static, debootstrap,
#                                   postgresql, prometheus, chromium, chromium-driver
set -euo pipefail
want=()
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  want+=(python3-venv python3-dev)
fi
if [[ "${1:-all}" == all ]]; then
  command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || want+=(mosquitto)
  command -v socat >/dev/null 2>&1 || want+=(socat)
  command -v qemu-aarch64-static >/dev/null 2>&1 || want+=(qemu-user-static)
  command -v debootstrap >/dev/null 2>&1 || [[ -x /usr/sbin/debootstrap ]] || want+=(debootstrap)
  # the fleet store's PostgreSQL tests start a throwaway cluster with initdb/pg_ctl
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || want+=(postgresql)
  # the metrics e2e test scrapes the services with a real Prometheus server
  command -v prometheus >/dev/null 2>&1 || want+=(prometheus)
  # the dashboard's browser tests drive headless Chromium through selenium
  command -v chromium >/dev/null 2>&1 || want+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || want+=(chromium-driver)
fi
if ((${#want[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "missing Debian packages: ${want[*]} (run as root, or install them)" >&2
    exit 1
  fi
  echo "installing Debian packages: ${want[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi
# The Debian package starts a system-wide broker; the project runs its own on free
# loopback ports and never needs that one.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
  systemctl stop mosquitto || true
fi
