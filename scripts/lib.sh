# Shared by scripts/up, scripts/test and benches/: idempotent set-up.

# Cargo's build directory lives outside the clone, so a fresh clone (as CI
# makes) still builds incrementally.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flyfs/target}"
# Incremental artifacts of a workspace this size grow by gigabytes per
# edit-and-test round and buy little on a fresh clone: off.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# ensure_packages PKG...: installs the Debian packages that are missing, and
# nothing else, so running it again is free.
ensure_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing: ${missing[*]}" >&2
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# ensure_rust: the toolchain and cargo-nextest.
ensure_rust() {
    command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
    cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest
}
