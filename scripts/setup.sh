#!/usr/bin/env bash
# Set up what smsblock needs on a fresh Debian 12 machine (as root), in two weights:
#
#   scripts/setup.sh            the demo's weight: the native build's packages, the tools the
#                               demo runs (sfdisk, mkfs.ext4, debugfs, GRUB's boot.img), the
#                               core Python packages and the image extra; release build
#   scripts/setup.sh --debug    the tests' weight: all of the above plus the oracles, peers and
#                               simulators the tests use (qemu-img, mkfs tools, moto, the AWS
#                               CLI, vcsim, ...); Cython bounds/wraparound checks on
#   scripts/setup.sh --full     the tests' weight with the release build (benchmarks)
#
# Idempotent: a second run installs nothing and only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEBUG=0    # Cython checks on (the test build)
FULL=0     # everything the tests and benchmarks use
case "${1:-}" in
  --debug) DEBUG=1; FULL=1 ;;
  --full) FULL=1 ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [--debug|--full]" >&2; exit 2 ;;
esac

DEB_PACKAGES=(
  # native build: deflate (VMDK grains), xxh3 (change hash), zstd
  build-essential libdeflate-dev libxxhash-dev libzstd-dev
  # the demo's sample disk: partition table, ext4 root, a file changed in it, MBR boot code
  fdisk e2fsprogs grub-pc-bin
)
TEST_DEB_PACKAGES=(
  # disk-format oracle and peers measured by the benchmarks
  qemu-utils xxhash zstd
  # a second, independent streamOptimized VMDK writer the writer tests compare layouts with
  python3-vmdkstream
  # real tools that make test disks and filesystems (image step)
  xfsprogs btrfs-progs jfsutils ntfs-3g dosfstools
  # image step tests: registry hive writer, GRUB legacy stage1, other MBR boot codes
  libwin-hivex-perl grub-legacy syslinux-common mbr
  # the web console's browser tests drive headless Chromium through Selenium
  chromium chromium-driver
  # the boot tests run real kernels under QEMU, with a busybox initramfs
  qemu-system-x86 busybox-static
  # the service tests run the control plane on a real PostgreSQL too (tests/postgres_server.py)
  postgresql
)
[ $FULL = 1 ] && DEB_PACKAGES+=("${TEST_DEB_PACKAGES[@]}")

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The boot tests' kernel: Debian's linux-image package, downloaded (never installed on
# this host) into build/boot-debs/, where tests/boot_disks.py unpacks it.
if [ $FULL = 1 ] && ! ls build/boot-debs/linux-image-*-amd64_*_amd64.deb >/dev/null 2>&1; then
  kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}'; }
  kernel_pkg=$(kernel_pkg)
  [ -n "$kernel_pkg" ] || { apt-get update -qq; kernel_pkg=$(kernel_pkg); }
  echo "setup: downloading $kernel_pkg for the boot tests"
  mkdir -p build/boot-debs
  (cd build/boot-debs && apt-get download -qq "$kernel_pkg" 2>&1 | grep -v "unsandboxed" || true)
  ls build/boot-debs/linux-image-*-amd64_*_amd64.deb >/dev/null 2>&1 \
    || { echo "setup: could not download $kernel_pkg" >&2; exit 1; }
fi

# Python packages: the project itself (editable) with the extras of this weight.
# Build isolation is off so the build uses the Cython installed here.
pip_install() {
  local log
  log=$(mktemp)
  if ! $PYTHON -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; echo "setup: pip install $* failed" >&2; exit 1
  fi
  grep -v -E "^WARNING: (Location|Running pip)|^\[notice\]" "$log" || true
  rm -f "$log"
}
pip_install "cython>=3.0" "setuptools>=64" wheel
# The editable install builds the native modules in place, in the requested mode (once:
# a separate build_ext would compile them a second time).
export SMSBLOCK_DEBUG=$DEBUG
if [ $FULL = 1 ]; then
  pip_install --no-build-isolation -e ".[test,cloud,vsphere,image,postgresql]"
else
  pip_install --no-build-isolation -e ".[image]"
fi
$PYTHON -c "import smsblock" || { echo "setup: smsblock does not import" >&2; exit 1; }
if [ $FULL = 1 ]; then
  scripts/build-vcsim.sh   # vCenter simulator for the vSphere source's tests (Go, GOPATH mode)
fi
echo "setup: ready ($([ $DEBUG = 1 ] && echo debug || echo release) build)"
