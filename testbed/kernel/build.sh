#!/usr/bin/env bash
# Builds the testbed bzImage: Debian's linux-source-6.12 + config.fragment + patches/.
# Usage: build.sh WORKDIR OUT_BZIMAGE   (called by `cargo xtask testbed build`, which caches)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$1 out=$2
mkdir -p "$work"
cd "$work"

# Source: Debian's kernel source package (bookworm main).
if [ ! -f linux-source.tar.xz ]; then
  read -r pkg version < "$here/SOURCE"
  rm -rf pkg && mkdir pkg
  # The pinned version first; a newer one only if the mirror dropped it (then bump SOURCE).
  (cd pkg && apt-get download "$pkg=$version" 2>/dev/null) || {
    echo "warning: $pkg=$version is not on the mirror; using the candidate version (update testbed/kernel/SOURCE)" >&2
    (cd pkg && apt-get download "$pkg")
  }
  deb=$(ls pkg/"$pkg"_*.deb)
  dpkg-deb --fsys-tarfile "$deb" | tar -xO --wildcards '*linux-source-6.12.tar.xz' > linux-source.tar.xz.part
  mv linux-source.tar.xz.part linux-source.tar.xz
  rm -rf pkg
fi
rm -rf src && mkdir src
tar -xf linux-source.tar.xz -C src --strip-components=1
cd src
echo "kernel source: $(make -s kernelversion)"

for p in "$here"/patches/*.patch; do
  echo "applying $(basename "$p")"
  patch -p1 --forward --quiet < "$p"
done

make -s defconfig
make -s kvm_guest.config
scripts/kconfig/merge_config.sh -m .config "$here/config.fragment" >/dev/null
make -s olddefconfig

# A fragment option that Kconfig silently dropped (unmet dependency) is a broken testbed.
missing=0
while read -r line; do
  case "$line" in
    CONFIG_*=y) grep -qx "$line" .config || { echo "config: $line did not stick" >&2; missing=1; } ;;
    "# CONFIG_"*" is not set")
      sym=${line#\# }; sym=${sym%% *}
      grep -q "^$sym=y" .config && { echo "config: $sym should be off" >&2; missing=1; } ;;
  esac
done < "$here/config.fragment"
[ "$missing" = 0 ] || exit 1

echo "building bzImage with $(nproc) jobs (log: $work/build.log)"
make -j"$(nproc)" bzImage > "$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; echo "kernel build failed" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
cp .config "$(dirname "$out")/config"
cp arch/x86/boot/bzImage "$out.part" && mv "$out.part" "$out"
echo "bzImage: $out"
