#!/usr/bin/env bash
# The NumPy-only core on aarch64 — what `pip install .` builds on Graviton, Ampere or Apple-silicon Linux: the
# 'generic' kernels, no cpuid, char unsigned. Debian's arm64 Python 3.11 and NumPy are unpacked into a sysroot
# (nothing of the target is installed on this machine), setup.py runs on that Python under qemu-user and builds
# the extension with Debian's aarch64 cross gcc (its sysconfig names it), and the tests run there too —
# subprocesses included (sys.executable is a wrapper that starts qemu). Needs apt-get (root) for the cross tools.
#
#   bash scripts/aarch64.sh [PYTEST ARGS...]     (default: tests; the work folder is build/aarch64)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${LORAFUSE_AARCH64_DIR:-$ROOT/build/aarch64}
SYS=$WORK/sysroot
# the target's Python and NumPy with what they load; libmpdec3 (the decimal module) is not in Debian 12's arm64
PKGS="libc6 libgcc-s1 libstdc++6 libgomp1 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 libzstd1 libsqlite3-0
      libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1 libdb5.3 libgdbm6 libnsl2 libtirpc3 libgssapi-krb5-2
      libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1 python3.11-minimal libpython3.11-minimal
      libpython3.11-stdlib libpython3.11 libpython3.11-dev python3.11 python3.11-dev python3-numpy libblas3 liblapack3
      libgfortran5"

# the tools come from Debian: elsewhere (or without root) the run is skipped, saying so
if ! command -v apt-get > /dev/null || [ "$(id -u)" != 0 ]; then
    echo "aarch64.sh: SKIPPED — needs Debian's apt-get as root for the cross gcc, qemu-user and the arm64 packages"
    exit 0
fi
echo "== aarch64: cross gcc, qemu-user and Debian's arm64 Python 3.11 + NumPy into $SYS"
dpkg --add-architecture arm64
apt-get update -q > /dev/null
apt-get install -y -q gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user > /dev/null
rm -rf "$WORK"
mkdir -p "$WORK/debs" "$SYS" "$WORK/bin" "$WORK/src"
# as root, into a folder apt's sandbox user may not reach (else apt says so, for every run)
# shellcheck disable=SC2086  # one word per package
(cd "$WORK/debs" && apt-get -o APT::Sandbox::User=root download -q $(printf '%s:arm64 ' $PKGS) > /dev/null)
for deb in "$WORK"/debs/*.deb; do dpkg -x "$deb" "$SYS"; done
# Debian points these at a BLAS / LAPACK through update-alternatives, which an unpacked sysroot has not run
lib=$SYS/usr/lib/aarch64-linux-gnu
ln -sf blas/libblas.so.3 "$lib/libblas.so.3"
ln -sf lapack/liblapack.so.3 "$lib/liblapack.so.3"
cat > "$WORK/bin/python3" << EOF
#!/bin/sh
export QEMU_LD_PREFIX="$SYS"
exec qemu-aarch64 -0 "$WORK/bin/python3" "$SYS/usr/bin/python3.11" "\$@"
EOF
chmod +x "$WORK/bin/python3"
# tests/test_cuda_build.py compiles its host references with g++: the target's
ln -sf "$(command -v aarch64-linux-gnu-g++)" "$WORK/bin/g++"
python -m pip install -q --disable-pip-version-check --target "$WORK/site" pytest "setuptools>=77" \
    > "$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; exit 1; }

# shellcheck source=scripts/build_lib.sh
. "$ROOT/scripts/build_lib.sh"
(cd "$ROOT" && copy_tracked "$WORK/src" setup.py setup_cuda.py pyproject.toml README.md csrc kernels python tests \
    benchmarks docs examples)
cd "$WORK/src"
# the sysroot's headers first (setup.py's -I name this machine's paths, which the cross gcc would read otherwise)
inc="-I$SYS/usr/include/python3.11 -I$SYS/usr/include -I$SYS/usr/lib/python3/dist-packages/numpy/core/include"
echo "== aarch64: $("$WORK/bin/python3" -c 'import platform, sys; print(platform.machine(), sys.version.split()[0])')," \
    "setup.py build_ext (aarch64-linux-gnu-gcc)"
build_checked aarch64.sh "$WORK/build.log" env CFLAGS="$inc" PYTHONPATH="$WORK/site" LORAFUSE_CUDA=0 \
    "$WORK/bin/python3" setup.py -q build_ext --inplace
[ $# -gt 0 ] || set -- tests
echo "== aarch64: pytest $*"
# This machine's nvcc makes x86-64 host code: it cannot build the CUDA extension for the emulated aarch64 (an
# aarch64 machine's own nvcc would); its compile-only checks still run.
PATH="$WORK/bin:$PATH" PYTHONPATH="python:$WORK/site" "$WORK/bin/python3" -m pytest -q -p no:cacheprovider \
    --deselect tests/test_cuda_build.py::test_cuda_extension_builds_with_the_setup_hook "$@"
