#!/usr/bin/env bash
# Builds the patched dependencies that Cargo.toml's [patch.crates-io] points at, under deps/ (ignored by git):
# each is the published crate (from cargo's download cache, else crates.io; checked against its sha256) with
# nsa's patch from scripts/patches/ applied. Idempotent: a crate is rebuilt only when its patch changed.
#
#  - cubecl-cpp 0.11.3: inline PTX with a tied input (`in(tied)`: the result's initial value, `"+f"`
#    constraints), so a warpgroup MMA's accumulator can stay in flight across a loop; and launch bounds with a
#    minimum of one block per SM for kernels that use `setmaxnreg` (ptxas ignores it otherwise).
#    See docs/wgmma-research.md ("Patched CubeCL").
set -euo pipefail
cd "$(dirname "$0")/.."

patch_crate() {
  local name="$1" version="$2" sha256="$3"
  local patch="scripts/patches/$name-$version.patch" dest="deps/$name"
  local stamp
  stamp="$(sha256sum "$patch" | cut -d' ' -f1) $version"
  if [ -f "$dest/.nsa-patch" ] && [ "$(cat "$dest/.nsa-patch")" = "$stamp" ]; then
    return
  fi
  local archive
  archive="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$version.crate" 2>/dev/null | head -1 || true)"
  local tmp
  tmp="$(mktemp -d)"
  if [ -z "$archive" ]; then
    archive="$tmp/$name-$version.crate"
    curl -sSfL "https://static.crates.io/crates/$name/$name-$version.crate" -o "$archive"
  fi
  echo "$sha256  $archive" | sha256sum -c --quiet - || { echo "patch-deps: $archive: checksum mismatch" >&2; exit 1; }
  tar xzf "$archive" -C "$tmp"
  (cd "$tmp/$name-$version" && patch -s -p1 --no-backup-if-mismatch) < "$patch"
  rm -rf "$dest"
  mkdir -p deps
  mv "$tmp/$name-$version" "$dest"
  echo "$stamp" > "$dest/.nsa-patch"
  rm -rf "$tmp"
  echo "patch-deps: $dest ($name $version + $patch)"
}

patch_crate cubecl-cpp 0.11.3 fd9b916049eefb3b8f793a0da10d158c5900e377c35bc32abc235b33b05d5428
