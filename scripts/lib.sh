# Shared helpers of the project scripts: installing missing Debian packages, checking the Rust toolchain.
# Sourced, not run.

# ensure_packages PKG…: installs the packages that are not installed yet
# (apt-get update first, once, and only when something is missing).
ensure_packages() {
    local missing=()
    local p
    for p in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "== installing missing system packages: ${missing[*]}"
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "error: not root and no sudo: install ${missing[*]} by hand" >&2
            return 1
        fi
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# ensure_rust: cargo with rustfmt and clippy must be present (rustup installs them; no download here).
ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "error: cargo not found: install the Rust toolchain (rustup) first" >&2
        return 1
    fi
    local c
    for c in fmt clippy; do
        if ! cargo "$c" --version >/dev/null 2>&1; then
            echo "== adding rust component $c"
            rustup component add "$( [ "$c" = fmt ] && echo rustfmt || echo clippy )"
        fi
    done
}

# System packages the build and the tests need. Later parts of the project
# (pcap backend, end-to-end rig) add theirs here.
BUILD_PACKAGES=(gcc libc6-dev pkg-config libpcap-dev)
