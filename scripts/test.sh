#!/usr/bin/env bash
# scripts/test.sh — THE test command for ferryfs (CI runs it through .ci/run).
#
#   1. scripts/setup.sh            system packages, /dev/fuse (idempotent)
#   2. cargo fmt --check
#   3. cargo clippy --all-targets -- -D warnings
#   4. cargo nextest run --workspace --no-fail-fast   (or `cargo test` without nextest), with
#      FUSE over io_uring turned on for the run (the fuse module's enable_uring) and put back
#   5. a closing line "tests: N passed, N failed" (CI reads it to know tests really ran)
#
# Steps 2-4 all run even if an earlier one fails, so one run reports everything; the script
# exits non-zero if any step failed. Tests mount FUSE file systems, so this runs as root.
# Warnings are errors via clippy -D warnings (see scripts/env.sh for why not RUSTFLAGS).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/env.sh
source "$SCRIPT_DIR/env.sh"
cd "$FERRYFS_ROOT"

START=$SECONDS
declare -a RESULTS=()
FAILED=0

# FUSE over io_uring is a host setting (the fuse module's enable_uring, off by default): the
# suite runs with it on, so that the tests of the io_uring transport can mount over it, and
# puts back what it found on exit.
URING_PARAM=/sys/module/fuse/parameters/enable_uring
URING_WAS=""

on_exit() {
    local rc=$?
    ferryfs_cleanup_stale_mounts /tmp/ || true
    if [[ -n "$URING_WAS" ]]; then
        echo "$URING_WAS" >"$URING_PARAM" || echo "test.sh: could not put $URING_PARAM back to $URING_WAS" >&2
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

header() { printf '\n==== %s ====\n' "$*"; }

# run_step NAME CMD... : run a step, record "NAME ok|FAILED (rc)", never abort the script.
run_step() {
    local name="$1" rc=0 t0=$SECONDS
    shift
    header "$name: $*"
    "$@" || rc=$?
    if ((rc == 0)); then
        RESULTS+=("$name: ok ($((SECONDS - t0))s)")
    else
        RESULTS+=("$name: FAILED (exit $rc, $((SECONDS - t0))s)")
        FAILED=1
    fi
}

header "setup"
bash "$SCRIPT_DIR/setup.sh" || { echo "test.sh: FAIL — scripts/setup.sh failed" >&2; exit 1; }

header "clean up stale ferryfs mounts under /tmp"
ferryfs_cleanup_stale_mounts /tmp/

header "FUSE over io_uring"
if [[ -w "$URING_PARAM" ]]; then
    URING_WAS="$(cat "$URING_PARAM")"
    echo Y >"$URING_PARAM"
    echo "$URING_PARAM: $URING_WAS -> $(cat "$URING_PARAM") for this run"
else
    echo "$URING_PARAM is missing or read-only: the io_uring transport's tests will fail and say so"
fi

header "environment"
echo "repo:             $FERRYFS_ROOT"
echo "CARGO_TARGET_DIR: $CARGO_TARGET_DIR"
echo "CI:               ${CI:-<unset>}"
cargo --version
rustc --version

run_step fmt cargo fmt --all --check
run_step clippy cargo clippy --all-targets -- -D warnings
TEST_LOG="$(mktemp)"
if command -v cargo-nextest >/dev/null 2>&1; then
    # shellcheck disable=SC2016 # $1 expands in the inner shell
    run_step tests bash -o pipefail -c 'cargo nextest run --workspace --no-fail-fast 2>&1 | tee "$1"' _ "$TEST_LOG"
    # "Summary [ 43.9s] 25 tests run: 25 passed, 0 skipped" (failures add "N failed")
    summary="$(grep -E 'Summary \[' "$TEST_LOG" | tail -1)"
    passed="$(grep -oE '[0-9]+ passed' <<<"$summary" | grep -oE '[0-9]+' || echo 0)"
    failed="$(grep -oE '[0-9]+ failed' <<<"$summary" | grep -oE '[0-9]+' || echo 0)"
else
    echo "cargo-nextest not found; using cargo test"
    # shellcheck disable=SC2016 # $1 expands in the inner shell
    run_step tests bash -o pipefail -c 'cargo test --workspace --no-fail-fast 2>&1 | tee "$1"' _ "$TEST_LOG"
    passed="$(grep -E '^test result:' "$TEST_LOG" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' | awk '{s+=$1} END {print s+0}')"
    failed="$(grep -E '^test result:' "$TEST_LOG" | grep -oE '[0-9]+ failed' | grep -oE '[0-9]+' | awk '{s+=$1} END {print s+0}')"
fi
rm -f "$TEST_LOG"
if ((passed == 0)); then
    RESULTS+=("tests: FAILED (no test ran)")
    FAILED=1
fi

elapsed=$((SECONDS - START))
header "summary"
for r in "${RESULTS[@]}"; do
    echo "  $r"
done
if ((FAILED)); then
    printf 'test.sh: FAIL — %s (%dm%02ds)\n' "$(printf '%s\n' "${RESULTS[@]}" | grep FAILED | cut -d: -f1 | paste -sd, -)" $((elapsed / 60)) $((elapsed % 60))
    echo "tests: ${passed} passed, ${failed} failed"
    exit 1
fi
printf 'test.sh: PASS — fmt, clippy and tests all passed (%dm%02ds)\n' $((elapsed / 60)) $((elapsed % 60))
echo "tests: ${passed} passed, ${failed} failed"
