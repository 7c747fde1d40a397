#!/usr/bin/env bash
# Build (once) the arm64 emulation environment used by mbn_codegen.emulation and `pytest -m qemu`:
#
#   DEST/sysroot/    Debian bookworm arm64 python3.11 + the shared libraries it needs (dpkg -x)
#   DEST/site/       aarch64 wheels unzipped: tvm, tvm_ffi, numpy, ml_dtypes, packaging, ...
#   DEST/downloads/  the .debs and wheels (a rebuild with these present needs no network)
#   DEST/apt/        private apt state (arm64 package lists); the host's apt setup is untouched
#   DEST/.complete   written last; holds the recipe line a rerun compares against
#
# Usage: scripts/arm64_sysroot.sh [DEST]
#   DEST defaults to ${MBN_ARM64_ROOT:-$HOME/.cache/mbn-codegen/arm64}.
#   MBN_PYTHON picks the host python whose pip downloads the wheels and whose numpy version is
#   mirrored (default: the repo's .venv/bin/python, else python3).
# Needs on the host: apt-get, dpkg (Debian/Ubuntu); qemu-user to use the result.
set -euo pipefail

RECIPE_VERSION=1
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g libffi8
      libssl3 libstdc++6 libgcc-s1 libbz2-1.0 liblzma5 libsqlite3-0 libuuid1 libncursesw6 libtinfo6
      libreadline8 libdb5.3 libgdbm6 libcrypt1 libnsl2 libtirpc3 libgssapi-krb5-2 libkrb5-3
      libk5crypto3 libcom-err2 libkrb5support0 libkeyutils1)
TVM_PIN="apache-tvm==0.27.0.post1"
FFI_PIN="apache-tvm-ffi==0.1.14.post0"
NUMPY_FALLBACK="2.4.6"   # pyproject.toml's pin, used when the host python has no numpy

DEST="${1:-${MBN_ARM64_ROOT:-$HOME/.cache/mbn-codegen/arm64}}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
t0=$SECONDS
log() { printf '[arm64-sysroot %3ds] %s\n' "$((SECONDS - t0))" "$*"; }
die() { printf 'arm64_sysroot.sh: error: %s\n' "$*" >&2; exit 1; }

if [[ -n "${MBN_PYTHON:-}" ]]; then PY="$MBN_PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"
else PY="$(command -v python3 || true)"; fi
[[ -n "$PY" ]] || die "no host python found (set MBN_PYTHON)"

# Wheel pins: numpy (and its small companions) at the host venv's versions, so host and emulated
# runs use the same numpy.
host_version() {  # $1 = distribution name; prints its version in $PY, or nothing
    "$PY" -c 'import sys, importlib.metadata as m
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1" 2>/dev/null || true
}
pin() {  # $1 = name, $2 = fallback version (may be empty)
    local v; v="$(host_version "$1")"; v="${v:-$2}"
    if [[ -n "$v" ]]; then echo "$1==$v"; else echo "$1"; fi
}
WHEELS=("$TVM_PIN" "$FFI_PIN" "$(pin numpy "$NUMPY_FALLBACK")" "$(pin ml_dtypes "")"
        "$(pin packaging "")" "$(pin typing_extensions "")")
RECIPE="recipe=$RECIPE_VERSION debs=${DEBS[*]} wheels=${WHEELS[*]}"

if [[ -f "$DEST/.complete" ]] && [[ "$(head -n1 "$DEST/.complete")" == "$RECIPE" ]]; then
    log "up to date: $DEST"
    exit 0
fi

command -v apt-get >/dev/null && command -v dpkg >/dev/null || die "needs apt-get and dpkg (Debian/Ubuntu host)"
mkdir -p "$(dirname "$DEST")"
DEST="$(cd "$(dirname "$DEST")" && pwd)/$(basename "$DEST")"

# One builder at a time per DEST.
exec 9>"$DEST.lock"
flock 9
if [[ -f "$DEST/.complete" ]] && [[ "$(head -n1 "$DEST/.complete")" == "$RECIPE" ]]; then
    log "up to date (built by a concurrent run): $DEST"
    exit 0
fi

# Build everything in a sibling temp dir, rename into place at the end.
TMP="$(mktemp -d "$DEST.tmp.XXXXXX")"
cleanup() { rm -rf "$TMP"; }
trap cleanup EXIT
log "building in $TMP (recipe $RECIPE_VERSION)"

# Reuse earlier downloads and apt lists (hard links: cheap, and the old tree stays intact).
for d in downloads apt; do
    if [[ -d "$DEST/$d" ]]; then cp -al "$DEST/$d" "$TMP/$d"; fi
done
mkdir -p "$TMP/downloads/debs" "$TMP/downloads/wheels" "$TMP/sysroot" "$TMP/site"

# ---------------------------------------------------------------- arm64 .debs
have_all_debs() {
    local p n
    for p in "${DEBS[@]}"; do
        n=$( (compgen -G "$TMP/downloads/debs/${p}_*.deb" || true) | wc -l)  # no '_' in package names
        [[ "$n" == 1 ]] || return 1
    done
}
if have_all_debs; then
    log "debs: all ${#DEBS[@]} present in downloads/debs, no network needed"
else
    # Private apt: same sources as the host, arm64 only, own lists/cache, empty dpkg status.
    A="$TMP/apt"
    mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/sources.list.d"
    : > "$A/sources.list"
    if [[ -f /etc/apt/sources.list ]]; then cp /etc/apt/sources.list "$A/sources.list"; fi
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        if [[ -f "$f" ]]; then cp "$f" "$A/sources.list.d/"; fi
    done
    grep -qrsE '^[[:space:]]*(deb|URIs:)' "$A/sources.list" "$A/sources.list.d" \
        || die "no apt sources found in /etc/apt/sources.list{,.d}"
    APT_OPTS=(-q -oAPT::Architecture=arm64 -oAPT::Architectures::=arm64
              "-oDir::State=$A" "-oDir::State::Lists=$A/lists" "-oDir::State::status=/dev/null"
              "-oDir::Cache=$A/cache" "-oDir::Etc::SourceList=$A/sources.list"
              "-oDir::Etc::SourceParts=$A/sources.list.d")
    # As root apt drops to user _apt, which cannot write into a private dir under $HOME.
    if [[ "$(id -u)" == 0 ]]; then APT_OPTS+=(-oAPT::Sandbox::User=root); fi
    log "debs: apt-get update (arm64, private lists in $A)"
    apt-get "${APT_OPTS[@]}" --error-on=any update >"$TMP/apt-update.log" 2>&1 \
        || { cat "$TMP/apt-update.log" >&2; die "apt-get update failed"; }
    grep -E '^(W|E):' "$TMP/apt-update.log" >&2 || true
    log "debs: downloading ${#DEBS[@]} arm64 packages"
    NEW="$TMP/downloads/debs.new"
    mkdir -p "$NEW"
    (cd "$NEW" && apt-get "${APT_OPTS[@]}" download "${DEBS[@]}") >"$TMP/apt-download.log" 2>&1 \
        || { cat "$TMP/apt-download.log" >&2; die "apt-get download failed"; }
    rm -rf "$TMP/downloads/debs"
    mv "$NEW" "$TMP/downloads/debs"
    have_all_debs || die "apt-get download did not produce one .deb per package"
fi
log "debs: extracting into sysroot"
for p in "${DEBS[@]}"; do
    dpkg -x "$(compgen -G "$TMP/downloads/debs/${p}_*.deb")" "$TMP/sysroot"
done
[[ -x "$TMP/sysroot/usr/bin/python3.11" ]] || die "sysroot has no usr/bin/python3.11"
[[ -e "$TMP/sysroot/lib/ld-linux-aarch64.so.1" ]] || die "sysroot has no lib/ld-linux-aarch64.so.1"

# ---------------------------------------------------------------- aarch64 wheels
# The host's pip config adds a constraints file meant for the host venv; it has no business
# here, so it is switched off. Indexes, find-links and cert settings are kept.
PIP_ARGS=(download --no-deps --only-binary=:all: --python-version 3.11 --implementation cp
          --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64
          --platform manylinux2014_aarch64 --platform any
          --disable-pip-version-check --progress-bar off -q)
W="$TMP/downloads/wheels"
if PIP_CONSTRAINT= "$PY" -m pip "${PIP_ARGS[@]}" --no-index --find-links "$W" -d "$W.offline" \
        "${WHEELS[@]}" >/dev/null 2>&1; then
    log "wheels: all present in downloads/wheels, no network needed"
else
    log "wheels: pip download ${WHEELS[*]}"
    rm -rf "$W.offline"
    # (stderr to a log: the host's extra file:// indexes make pip warn about every missing name)
    PIP_CONSTRAINT= "$PY" -m pip "${PIP_ARGS[@]}" -d "$W.offline" "${WHEELS[@]}" \
        >"$TMP/pip-download.log" 2>&1 \
        || { cat "$TMP/pip-download.log" >&2; die "pip download of the aarch64 wheels failed"; }
fi
rm -rf "$W"
mv "$W.offline" "$W"
log "wheels: unzipping $(ls "$W" | wc -l) wheels into site"
for whl in "$W"/*.whl; do
    "$PY" -m zipfile -e "$whl" "$TMP/site"
done
# zipfile drops the exec bits; restore them on shared objects and executables.
find "$TMP/site" -type f \( -name '*.so' -o -name '*.so.*' -o -path '*/bin/*' \) -exec chmod +x {} +
[[ -f "$TMP/site/tvm/lib/libtvm_runtime.so" ]] || die "site has no tvm/lib/libtvm_runtime.so"

# Byte-compile with the host python when it is also 3.11 (.pyc files do not depend on the CPU):
# under emulation an import of numpy + tvm_ffi then takes ~1.2 s instead of ~4 s, and runs never
# need to write into DEST.
if [[ "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" == 3.11 ]]; then
    log "byte-compiling site and the stdlib with $PY"
    "$PY" -m compileall -q -j0 "$TMP/site" "$TMP/sysroot/usr/lib/python3.11" >/dev/null 2>&1 || true
else
    log "host python is not 3.11: skipping byte-compilation (first emulated imports are slower)"
fi

rm -f "$TMP"/apt-*.log "$TMP"/pip-*.log
{
    echo "$RECIPE"
    echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) by $(basename "$0") on $(uname -m)"
    (cd "$TMP/downloads" && ls debs wheels)
} > "$TMP/.complete"

# Swap into place.
if [[ -e "$DEST" ]]; then
    OLD="$DEST.old.$$"
    mv "$DEST" "$OLD"
    mv "$TMP" "$DEST"
    rm -rf "$OLD"
else
    mv "$TMP" "$DEST"
fi
trap - EXIT
log "done: $DEST ($(du -sh "$DEST" | cut -f1))"
