#!/usr/bin/env bash
# The C extension built by clang instead of GCC (setup.py with CC=clang: the same -std=c11 -Wall -Wextra and
# per-file ISA flags), what a user whose compiler is clang gets. Clang refuses some things GCC accepts — an
# intrinsic's immediate given as a const variable — so a GCC-only CI would not see them. Warnings fail it too.
#
#   bash scripts/clang_build.sh      (clang from Debian's apt-get as root where it is missing, else skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v clang > /dev/null; then
    if command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
        apt-get install -y -q clang > /dev/null
    else
        echo "clang_build.sh: SKIPPED — no clang here, and no apt-get as root to install it"
        exit 0
    fi
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck source=scripts/build_lib.sh
. scripts/build_lib.sh
build_checked clang_build.sh "$work/build.log" env CC=clang LORAFUSE_CUDA=0 \
    python setup.py -q build_ext --build-temp "$work/temp" --build-lib "$work/lib"
echo "clang_build.sh: $(clang --version | head -1): $(cd "$work/lib/lorafuse" && ls _C*.so) built, no warnings"
