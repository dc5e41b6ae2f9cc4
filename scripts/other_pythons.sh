#!/usr/bin/env bash
# The NumPy-only core (`pip install .`: the C kernels, their bindings, the adapter-file and CLI checks) on
# other Pythons than the one CI runs: for each version named, its interpreter is looked up (pythonX.Y on
# PATH, else pyenv's), a fresh venv gets `pip install .` from a copy of the tracked files, and the test
# suite runs there (what needs torch skips with its reason). A version with no interpreter on this
# machine is reported and skipped; any build or test failure fails the script. The first version named gets
# pyproject.toml's NumPy floor (its `numpy>=` dependency) installed first, the others the newest NumPy.
#
#   scripts/other_pythons.sh 3.9 3.13      pyproject.toml's floors (requires-python, numpy) and the newest here
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: scripts/other_pythons.sh VERSION..." >&2; exit 2; }

find_python() {  # the interpreter of version $1 (X.Y), or nothing
    local found
    found=$(command -v "python$1" 2>/dev/null) && "$found" -c 'pass' 2>/dev/null && { echo "$found"; return; }
    command -v pyenv >/dev/null || return 0
    for found in "$(pyenv root)"/versions/"$1".*/bin/"python$1"; do
        [ -x "$found" ] && { echo "$found"; return; }
    done
    return 0
}

numpy_floor=$(sed -n 's/^dependencies = \["numpy>=\([0-9.]*\)"\]$/\1/p' pyproject.toml)
[ -n "$numpy_floor" ] || { echo "other_pythons: no numpy>= floor in pyproject.toml's dependencies" >&2; exit 2; }
numpy_pin="numpy==$numpy_floor"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck source=scripts/build_lib.sh
. scripts/build_lib.sh
copy_tracked "$work/src"  # the tracked files only, as in a clean clone
for version in "$@"; do
    pin=$numpy_pin numpy_pin=""  # the first version named only
    py=$(find_python "$version")
    if [ -z "$py" ]; then
        echo "other_pythons: no Python $version on this machine: skipped"
        continue
    fi
    echo "== Python $version ($py): pip install ${pin:+$pin }. pytest setuptools; pytest -q tests"
    "$py" -m venv "$work/venv$version"
    # shellcheck disable=SC2086  # no word when empty
    "$work/venv$version/bin/python" -m pip install -q --disable-pip-version-check $pin "$work/src" pytest \
        "setuptools>=77"
    "$work/venv$version/bin/python" -c 'import numpy; print("other_pythons: numpy", numpy.__version__)'
    # from a folder where `import lorafuse` can only find the installed package
    (cd "$work/src" && "$work/venv$version/bin/python" -m pytest -q -p no:cacheprovider tests)
done
