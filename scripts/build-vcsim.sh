#!/usr/bin/env bash
# Build vcsim, VMware's vCenter simulator, for the vSphere source's tests.
#
# Debian 12 ships govmomi 0.24 as Go sources (golang-github-vmware-govmomi-dev) but not the
# vcsim command, so we build tests/vcsim/main.go (a small main around simulator.VPX()) with
# Debian's Go in GOPATH mode against /usr/share/gocode: no module download, no network.
# Output: build/vcsim/vcsim. Idempotent: nothing is rebuilt while the binary is newer than
# main.go. Needs root only to install the two Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

SRC=tests/vcsim/main.go
OUT=build/vcsim/vcsim
PACKAGES=(golang-go golang-github-vmware-govmomi-dev)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-vcsim: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # other apt users (setup.sh run in parallel) hold the lock for a while: wait, don't fail
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -x "$OUT" ] && [ "$OUT" -nt "$SRC" ]; then
  echo "build-vcsim: $OUT is up to date"
  exit 0
fi

mkdir -p "$(dirname "$OUT")"
# GOPATH mode: the Debian Go sources plus a private dir for the build's own package cache.
export GO111MODULE=off
export GOPATH="$PWD/build/vcsim/gopath:/usr/share/gocode"
export GOCACHE="${GOCACHE:-$PWD/build/vcsim/gocache}"
export GOFLAGS=
start=$(date +%s)
go build -o "$OUT.tmp" "$SRC"
mv -f "$OUT.tmp" "$OUT"
echo "build-vcsim: built $OUT in $(( $(date +%s) - start ))s"
