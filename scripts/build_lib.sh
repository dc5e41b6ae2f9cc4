# Helpers sourced by the build scripts (sanitize.sh, clang_build.sh, aarch64.sh, other_pythons.sh).

# copy_tracked DEST [PATH...]: git's tracked files (under the PATHs, or all) of the repository the shell is in, copied
# into DEST with their folders: a clean clone's files, no build outputs.
copy_tracked() {
    local dest=$1
    shift
    mkdir -p "$dest"
    git ls-files -z -- "$@" | xargs -0 cp --parents -t "$dest"
}

# build_checked WHO LOG CMD...: run the build command CMD (its output to LOG) and stop the script, naming WHO, if
# it fails (LOG's last 40 lines shown) or if the compiler printed a warning (setup.py compiles with -Wall -Wextra).
build_checked() {
    local who=$1 log=$2
    shift 2
    "$@" > "$log" 2>&1 || { tail -40 "$log"; echo "$who: the build failed" >&2; exit 1; }
    if grep -q ": warning:" "$log"; then
        grep -A3 ": warning:" "$log"
        echo "$who: the build printed compiler warnings" >&2
        exit 1
    fi
}
