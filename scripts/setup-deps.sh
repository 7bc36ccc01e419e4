#!/usr/bin/env bash
# Installs what building and testing nsa needs on Debian 12 (bookworm):
#  - Mesa's lavapipe Vulkan driver, the software GPU the wgpu runtime uses when no real GPU is present;
#  - Debian's LLVM 22, pointed to by a shim where cubecl's LLVM bundler looks, so the cuda/hip runtimes build
#    offline (the bundler would otherwise download LLVM 23.1 at build time);
#  - the patched CubeCL crate Cargo.toml points at (scripts/patch-deps.sh: deps/cubecl-cpp);
#  - curl and a Python virtual environment with the `openai` package ($HOME/.cache/nsa-venv), the real
#    clients the server's tests drive `nsa serve` with.
# Idempotent: safe to run again.
set -euo pipefail

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

pkgs="mesa-vulkan-drivers libvulkan1 llvm-22-dev libpolly-22-dev liblld-22-dev xz-utils pkg-config curl python3-venv patch"
missing=""
for p in $pkgs; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup-deps: installing$missing"
  # llvm-22 comes from bookworm-security; make sure that suite is listed.
  if ! grep -rqs "bookworm-security" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian-security bookworm-security main" | $SUDO tee /etc/apt/sources.list.d/nsa-security.list >/dev/null
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

# The LLVM shim for tracel-llvm-bundler 23.1.0-4 (see ../shared/notes/platform-facts.md in the team notes).
data_home="${XDG_DATA_HOME:-$HOME/.local/share}"
shim_dir="$data_home/tracel/tracel-llvm-23.1.0-4"
mkdir -p "$shim_dir/bin"
cat > "$shim_dir/bin/llvm-config" <<'SHIM'
#!/usr/bin/env bash
# Debian's LLVM 22 standing in for the bundled LLVM 23.1. `--system-libs` drops libz3/libxml2, which the
# static link neither needs nor can find under those names.
real=/usr/lib/llvm-22/bin/llvm-config
if [ "${1:-}" = "--system-libs" ] || [[ " $* " == *" --system-libs "* ]]; then
  "$real" "$@" | tr ' ' '\n' | grep -v -e 'z3' -e 'xml2' | tr '\n' ' '
  echo
else
  exec "$real" "$@"
fi
SHIM
chmod +x "$shim_dir/bin/llvm-config"
touch "$shim_dir/.tracel-llvm-installed"
venv="${NSA_VENV:-$HOME/.cache/nsa-venv}"
if ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "openai>=1.50"
fi
"$(dirname "$0")/patch-deps.sh"
echo "setup-deps: ok (LLVM shim at $shim_dir, Python clients in $venv)"
