#!/usr/bin/env bash
# Installs everything the testbed and the test suite need on Debian 12 (as root).
# Idempotent: a second run installs nothing and takes seconds.
set -euo pipefail

APT_PKGS=(
  # kernel build
  build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils dwarves
  # RDMA userspace (libibverbs/librdmacm for rdma-sys, rxe provider, peer tools)
  rdma-core ibverbs-providers ibverbs-utils rdmacm-utils libibverbs-dev librdmacm-dev perftest
  # storage peer tools
  fio nvme-cli liburing-dev
  # guest networking, bindgen
  iproute2 libclang-dev clang pkg-config python3-venv
)

need_apt=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done

backports=/etc/apt/sources.list.d/bookworm-backports.sources
if [ ! -f "$backports" ]; then
  # Same mirror and key as the system's bookworm entry.
  uri=$(grep -h -m1 '^URIs:' /etc/apt/sources.list.d/debian.sources 2>/dev/null | awk '{print $2}')
  uri=${uri:-http://deb.debian.org/debian}
  cat >"$backports" <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  updated=0
fi

if [ ${#need_apt[@]} -gt 0 ] || ! command -v qemu-system-x86_64 >/dev/null || [ "${updated:-1}" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  [ ${#need_apt[@]} -gt 0 ] && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  # bookworm's qemu 7.2 conflicts with the image's backports qemu-utils.
  command -v qemu-system-x86_64 >/dev/null ||
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86
fi

# virtme-ng in a venv under the user's cache dir.
venv="${XDG_CACHE_HOME:-$HOME/.cache}/peerpipe/venv"
if [ ! -x "$venv/bin/vng" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'virtme-ng==1.42'
fi
echo "install-deps: ok (virtme-ng in $venv)"
