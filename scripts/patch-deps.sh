#!/usr/bin/env bash
# Builds the patched dependencies that Cargo.toml's [patch.crates-io] points at, deps/<crate> (ignored by git):
# each is the published crate (from cargo's download cache, else crates.io; checked against its sha256) with
# nsa's patch from scripts/patches/ applied, kept in $XDG_CACHE_HOME/nsa-deps under the patch's hash and
# linked from deps/. A fresh clone reuses it as it is (same files, same times: cargo rebuilds nothing); a
# changed patch gets a new directory whose files are all newer than any build (cargo rebuilds the crate).
#
#  - cubecl-cpp 0.11.3: inline PTX with a tied input (`in(tied)`: the result's initial value, `"+f"`
#    constraints), so a warpgroup MMA's accumulator can stay in flight across a loop; and launch bounds with a
#    minimum of one block per SM for kernels that use `setmaxnreg` (ptxas ignores it otherwise).
#    See docs/authoring-kernels.md ("Patched CubeCL").
set -euo pipefail
cd "$(dirname "$0")/.."

patch_crate() {
  local name="$1" version="$2" sha256="$3"
  local patch="scripts/patches/$name-$version.patch"
  local hash
  hash="$(sha256sum "$patch" | cut -c1-12)"
  local cache="${XDG_CACHE_HOME:-$HOME/.cache}/nsa-deps/$name-$version-$hash"
  if [ ! -f "$cache/.nsa-patched" ]; then
    local archive tmp
    archive="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$version.crate" 2>/dev/null | head -1 || true)"
    tmp="$(mktemp -d)"
    if [ -z "$archive" ]; then
      archive="$tmp/$name-$version.crate"
      curl -sSfL "https://static.crates.io/crates/$name/$name-$version.crate" -o "$archive"
    fi
    echo "$sha256  $archive" | sha256sum -c --quiet - || { echo "patch-deps: $archive: checksum mismatch" >&2; exit 1; }
    tar xzf "$archive" -C "$tmp"
    (cd "$tmp/$name-$version" && patch -s -p1 --no-backup-if-mismatch) < "$patch"
    find "$tmp/$name-$version" -exec touch {} +
    rm -rf "$cache"
    mkdir -p "$(dirname "$cache")"
    mv "$tmp/$name-$version" "$cache"
    touch "$cache/.nsa-patched"
    rm -rf "$tmp"
    echo "patch-deps: $cache ($name $version + $patch)"
  fi
  mkdir -p deps
  if [ "$(readlink "deps/$name" 2>/dev/null)" != "$cache" ]; then
    rm -rf "deps/$name"
    ln -s "$cache" "deps/$name"
  fi
}

patch_crate cubecl-cpp 0.11.3 fd9b916049eefb3b8f793a0da10d158c5900e377c35bc32abc235b33b05d5428
