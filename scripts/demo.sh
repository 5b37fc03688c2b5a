#!/usr/bin/env bash
# scripts/demo.sh — set everything up and run a real ferryfs migration demo, end to end.
#
# Builds the release binary, creates a small realistic dataset in OLD, prepares a migration,
# mounts the view IN PLACE over OLD (the main use: applications keep using the same path),
# then reads, appends, deletes and renames through the view, and shows where each change
# landed, then copies the rest (execute), verifies, and commits: NEW ends up a plain copy of
# the view. OLD itself is never modified; to show that while the view covers OLD, a private
# bind mount of OLD ("old-underneath") is made before the view is mounted.
# Everything lives in a fresh temp dir that is unmounted and removed on exit.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=scripts/env.sh
source "$SCRIPT_DIR/env.sh"
cd "$FERRYFS_ROOT"

STEP=0
BOLD="" RESET=""
if [[ -t 1 ]]; then BOLD=$'\033[1m' RESET=$'\033[0m'; fi
step() {
    STEP=$((STEP + 1))
    printf '\n%s==== [%d] %s ====%s\n' "$BOLD" "$STEP" "$*" "$RESET"
}
run() {
    printf '$ %s\n' "$*"
    "$@"
}
die() {
    printf '\ndemo.sh: FAIL — %s\n' "$*" >&2
    exit 1
}
is_mounted() { mountpoint -q -- "$1" 2>/dev/null; }

TMP=""
OLD="" NEW="" STATE="" UNDER=""
VIEW_MOUNTED=0 UNDER_MOUNTED=0
BIN="$FERRYFS_RELEASE_BIN"

cleanup() {
    local rc=$?
    set +e
    if [[ -n "$TMP" ]]; then
        if ((rc != 0)) && [[ -f "$STATE/ferryfs.log" ]]; then
            printf '\n---- last 40 lines of %s ----\n' "$STATE/ferryfs.log" >&2
            tail -n 40 "$STATE/ferryfs.log" >&2
        fi
        if ((VIEW_MOUNTED)) && is_mounted "$OLD"; then
            "$BIN" unmount "$OLD" 2>/dev/null || fusermount3 -u -z "$OLD" 2>/dev/null || umount -l "$OLD"
        fi
        if ((UNDER_MOUNTED)) && is_mounted "$UNDER"; then
            umount "$UNDER" 2>/dev/null || umount -l "$UNDER"
        fi
        # Never rm -rf through a mount point: only remove the tree when nothing is mounted in it.
        if grep -qF " $TMP/" /proc/mounts; then
            printf 'demo.sh: WARNING: something is still mounted under %s; leaving it in place\n' "$TMP" >&2
        else
            rm -rf --one-file-system -- "$TMP"
        fi
    fi
    if ((rc == 0)); then
        printf '\ndemo.sh: PASS — demo migration completed, temp dirs removed\n'
    else
        printf '\ndemo.sh: FAIL (exit %d) at step %d\n' "$rc" "$STEP" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
step "Set up the machine (scripts/setup.sh --demo: only what the demo needs)"
bash "$SCRIPT_DIR/setup.sh" --demo || die "scripts/setup.sh --demo failed"

step "Build the release binary (cargo build --release)"
run cargo build --release || die "cargo build --release failed"
[[ -x "$BIN" ]] || die "release binary not found at $BIN"
echo "binary: $BIN"

step "Create a fresh temp dir"
ferryfs_cleanup_stale_mounts /tmp/
base="${FERRYFS_DEMO_DIR:-/tmp}"
TMP="$(mktemp -d "$base/ferryfs-demo.XXXXXX")"
# The demo sets a user xattr; some file systems (tmpfs on older kernels) refuse those.
touch "$TMP/.xattr-probe"
if ! setfattr -n user.probe -v 1 "$TMP/.xattr-probe" 2>/dev/null; then
    echo "$base does not support user xattrs; using /var/tmp instead"
    rm -rf -- "$TMP"
    TMP="$(mktemp -d /var/tmp/ferryfs-demo.XXXXXX)"
fi
rm -f -- "$TMP/.xattr-probe"
OLD="$TMP/data"            # the live dataset; the view is mounted right here
NEW="$TMP/new"             # the migration target
STATE="$TMP/state"         # RocksDB journal + ferryfs.log
UNDER="$TMP/old-underneath" # private bind mount of OLD, to peek under the view
mkdir -p "$OLD" "$NEW" "$UNDER"
echo "OLD   = $OLD   (also the mount point of the view)"
echo "NEW   = $NEW"
echo "STATE = $STATE"

step "Populate OLD with a small realistic tree"
mkdir -p "$OLD/docs/notes/2024" "$OLD/projects/alpha/src" "$OLD/projects/beta/src" \
    "$OLD/media" "$OLD/tmp"
printf 'Welcome to the dataset.\nThis file lives only in OLD until it is copied.\n' >"$OLD/docs/readme.txt"
printf 'January notes: migrate storage without downtime.\n' >"$OLD/docs/notes/2024/january.txt"
printf 'Owner is recorded in an extended attribute.\n' >"$OLD/docs/tagged.txt"
setfattr -n user.owner -v alice "$OLD/docs/tagged.txt"
printf '#include <stdio.h>\nint main(void) { puts("alpha"); return 0; }\n' >"$OLD/projects/alpha/src/main.c"
printf '2024-01-01 build 1 ok\n2024-01-02 build 2 ok\n' >"$OLD/projects/alpha/build.log"
printf 'fn main() { println!("beta"); }\n' >"$OLD/projects/beta/src/main.rs"
printf '# beta\nThe beta project.\n' >"$OLD/projects/beta/README.md"
printf 'scratch data, safe to delete\n' >"$OLD/tmp/scratch.txt"
head -c $((20 * 1024 * 1024)) /dev/urandom >"$OLD/media/blob.bin"
ln -s projects/alpha "$OLD/current"                       # symlink
ln "$OLD/docs/readme.txt" "$OLD/docs/readme-hardlink.txt" # hard link
run find "$OLD" -printf '%y %10s  %P\n'
blob_sum="$(sha256sum <"$OLD/media/blob.bin" | cut -d' ' -f1)"
echo "sha256(media/blob.bin) = $blob_sum"

step "Prepare the migration (ferryfs prepare)"
run "$BIN" prepare --old "$OLD" --new "$NEW" --state "$STATE" || die "ferryfs prepare failed"

step "Keep a view of OLD underneath: private bind mount made BEFORE the view is mounted"
run mount --bind "$OLD" "$UNDER" || die "bind mount of OLD failed"
UNDER_MOUNTED=1
# Private, so the view mounted on OLD next does not propagate onto this bind mount.
run mount --make-private "$UNDER" || die "mount --make-private failed"

step "Mount the view IN PLACE over OLD (ferryfs mount, mount point == OLD)"
# --no-copy: keep the background copier off so the fall-through reads below stay fall-through.
run "$BIN" mount --state "$STATE" "$OLD" --no-copy || die "ferryfs mount failed"
VIEW_MOUNTED=1
for _ in $(seq 1 50); do
    is_mounted "$OLD" && break
    sleep 0.1
done
is_mounted "$OLD" || die "the view is not mounted on $OLD"
run findmnt -T "$OLD"
echo "(daemon log: $STATE/ferryfs.log)"

step "List the dataset through the view (ls -la)"
run ls -la "$OLD" "$OLD/docs" "$OLD/projects"
run stat -c '%n: inode %i, %h links' "$OLD/docs/readme.txt" "$OLD/docs/readme-hardlink.txt"
run readlink "$OLD/current"
run getfattr -n user.owner "$OLD/docs/tagged.txt" || die "xattr not visible through the view"

step "Read files that still live only in OLD (fall-through)"
run cat "$OLD/docs/notes/2024/january.txt" || die "fall-through read failed"
cmp "$OLD/docs/notes/2024/january.txt" "$UNDER/docs/notes/2024/january.txt" \
    || die "view and OLD differ for docs/notes/2024/january.txt"
view_sum="$(sha256sum <"$OLD/media/blob.bin" | cut -d' ' -f1)"
echo "sha256(media/blob.bin) through the view = $view_sum"
[[ "$view_sum" == "$blob_sum" ]] || die "20 MiB file read through the view does not match OLD"
echo "OK: the view serves OLD's content for files not yet in NEW"
run ls -laR "$NEW"

step "Append to a file through the view (the write lands in NEW)"
line='2024-01-03 build 3 ok (written through the view)'
printf "$ echo '%s' >> %s\n" "$line" "$OLD/projects/alpha/build.log"
echo "$line" >>"$OLD/projects/alpha/build.log" || die "append through the view failed"
run cat "$OLD/projects/alpha/build.log"
echo "-- NEW now holds the file:"
run ls -la "$NEW/projects/alpha" || true
[[ -f "$NEW/projects/alpha/build.log" ]] || die "appended file did not land in NEW"
cmp "$OLD/projects/alpha/build.log" "$NEW/projects/alpha/build.log" \
    || die "NEW's copy of build.log differs from the view"
echo "-- OLD underneath is unchanged:"
run cat "$UNDER/projects/alpha/build.log"
if grep -q 'build 3' "$UNDER/projects/alpha/build.log"; then
    die "the append modified OLD"
fi

step "Delete a file through the view (gone from the view, still in OLD underneath)"
run rm "$OLD/tmp/scratch.txt" || die "rm through the view failed"
run ls -la "$OLD/tmp"
[[ ! -e "$OLD/tmp/scratch.txt" ]] || die "deleted file is still visible in the view"
echo "-- OLD underneath still has it:"
run ls -la "$UNDER/tmp"
[[ -f "$UNDER/tmp/scratch.txt" ]] || die "the delete removed the file from OLD"

step "Rename a directory through the view (projects/beta -> projects/gamma)"
run mv "$OLD/projects/beta" "$OLD/projects/gamma" || die "directory rename through the view failed"
run ls -la "$OLD/projects" "$OLD/projects/gamma"
[[ ! -e "$OLD/projects/beta" ]] || die "old directory name still visible after rename"
run cat "$OLD/projects/gamma/README.md" || die "cannot read a file in the renamed directory"
echo "-- OLD underneath keeps the old name:"
run ls -la "$UNDER/projects"
[[ -d "$UNDER/projects/beta" ]] || die "the rename modified OLD"

step "Migration status (ferryfs status --json)"
status_json="$("$BIN" status --state "$STATE" --json)" || die "ferryfs status --json failed"
printf '%s\n' "$status_json" | python3 -m json.tool || die "status --json did not print valid JSON"

step "Migration status (ferryfs status)"
run "$BIN" status --state "$STATE" || die "ferryfs status failed"

step "Copy everything else in the background (ferryfs execute --wait)"
run "$BIN" execute --state "$STATE" --wait || die "ferryfs execute failed"
run "$BIN" status --state "$STATE" || die "ferryfs status failed"

step "Verify every copy against OLD (ferryfs verify --checksum)"
run "$BIN" verify --state "$STATE" --checksum || die "ferryfs verify failed"

# What applications see right before commit: every entry with type, mode, size and content.
snapshot() {
    (cd "$1" && find . -mindepth 1 -printf '%y %m %s %P\n' | sort &&
        find . -type f -exec sha256sum {} + | sort -k2)
}
view_before="$(snapshot "$OLD")"

step "Commit (ferryfs commit): NEW becomes the dataset"
run "$BIN" commit --state "$STATE" || die "ferryfs commit failed"
run "$BIN" status --state "$STATE" || die "ferryfs status failed"

step "What NEW holds now: the whole view, as a plain tree"
run find "$NEW" -printf '%y %10s  %P\n'
[[ "$(snapshot "$NEW")" == "$view_before" ]] || die "NEW differs from what the view showed"
echo "OK: NEW equals the view (types, modes, sizes, content), with no ferryfs files"

step "Unmount the view (ferryfs unmount)"
run "$BIN" unmount "$OLD" || die "ferryfs unmount failed"
for _ in $(seq 1 50); do
    is_mounted "$OLD" || break
    sleep 0.1
done
is_mounted "$OLD" && die "$OLD is still mounted after ferryfs unmount"
VIEW_MOUNTED=0
echo "-- OLD is the original, untouched tree again (it may be retired now):"
run ls -la "$OLD/tmp" "$OLD/projects"

step "Remove the bind mount and temp dirs"
run umount "$UNDER" || die "umount of the bind mount failed"
UNDER_MOUNTED=0
# The EXIT trap removes $TMP.
