#!/usr/bin/env bash
# bench/run.sh — measure the ferryfs view against direct access and bindfs, in one command.
#
#   bash bench/run.sh [--quick]
#
# Variants (each on its own mount point, all backed by the same file system):
#   plain        the OLD directory itself, no FUSE
#   bindfs       `bindfs -o allow_other OLD MNT` (a plain FUSE passthrough, the peer)
#   mergerfs, fuse-overlayfs, unionfs-fuse   union peers: OLD read-only below, an empty NEW
#                on top taking writes (mount options as ../shared/conformance/README.md)
#   ferryfs-old  a ferryfs view whose NEW is empty: reads fall through to OLD
#   ferryfs-old-pt  the same with `mount --passthrough all`: the kernel reads OLD's files itself
#   ferryfs-old-uring  ferryfs-old served over FUSE io_uring (`mount --transport uring`; the
#                other ferryfs variants mount with `--transport dev`); turns on enable_uring
#                for the run as passthrough_hp-uring does
#   ferryfs-new  a second ferryfs migration of the same OLD whose NEW got a copy of the big
#                file after `prepare` and before `mount`: reads are served from NEW
#   passthrough_hp, passthrough_hp-uring   libfuse's high-performance pass-through of OLD
#                (example/passthrough_hp), over /dev/fuse and over io_uring: the fastest FUSE
#                pass-through on this kernel. Only with BENCH_LIBFUSE_SRC (below); the
#                -uring variant turns on /sys/module/fuse/parameters/enable_uring for the run
#                and puts back its value afterwards.
# Workloads: first byte of files not read yet (cold, right after the mount), seq read
# cold/warm, seq write + fsync, 4 KiB random read (warm, QD1 psync and QD16 io_uring),
# small-file creates, untar of small files and rm -rf of them, and recursive stat of a
# small-file tree (cold = caches dropped right after a fresh mount, warm = the pass right
# after). Every variant is mounted afresh for each run; each cell
# is the median of 3 runs (1 with --quick). Prints a Markdown table and writes it, with the
# date, kernel and exact command, to bench/results/latest.md.
#
# Needs root (drop_caches, allow_other), /dev/fuse, fio, bindfs, mergerfs, fuse-overlayfs,
# unionfs-fuse, fusermount3, python3 (scripts/setup.sh installs them).
# Scratch data lives in $BENCH_SCRATCH/ferryfs-bench-$$ (default /var/tmp; about 4 GiB free
# needed, 0.8 GiB with --quick) and is removed, with everything unmounted, on exit — also on
# failure or Ctrl-C.
#
# Environment:
#   FERRYFS_BIN        ferryfs binary (default $CARGO_TARGET_DIR/release/ferryfs; when it is
#                      missing, `cargo build --release` runs first)
#   CARGO_TARGET_DIR   default /root/.cache/ferryfs/target (scripts/env.sh, if present)
#   BENCH_VARIANTS     subset to run, e.g. "plain bindfs" (plain is always the baseline)
#   BENCH_FILE_MB, BENCH_TREE_N, BENCH_CREATE_N, BENCH_UNTAR_N, BENCH_REPS   override the
#                      sizes / run count
#   BENCH_OUT          results file (default bench/results/latest.md)
#   BENCH_SCRATCH      the directory whose file system every variant works on (default
#                      /var/tmp); e.g. a journaled ext4 when the root's has no journal
#   BENCH_MOUNT_ARGS   extra `ferryfs mount` arguments for every ferryfs variant, e.g.
#                      "--metadata-ttl 30"
#   BENCH_ALLOW_DEBUG  set to measure a FERRYFS_BIN under target/debug (refused otherwise)
#   BENCH_LIBFUSE_SRC  a libfuse source tree (3.18 or later): adds the passthrough_hp
#                      variants, built with meson and ninja into BENCH_LIBFUSE_BUILD (default
#                      ~/.cache/ferryfs/libfuse-build; needs meson, ninja-build, g++,
#                      pkg-config, liburing-dev)
set -euo pipefail
shopt -s inherit_errexit

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$BENCH_DIR/.." && pwd)"
JOBS="$BENCH_DIR/jobs"
SMALLFILES="$BENCH_DIR/smallfiles.py"
REPORT="$BENCH_DIR/report.py"

log() { printf '[bench] %s\n' "$*"; }
die() {
    printf '\nbench/run.sh: FAIL — %s\n' "$*" >&2
    exit 1
}
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

# The exact command, with the environment overrides that change what it measures.
CMD=""
for v in FERRYFS_BIN CARGO_TARGET_DIR BENCH_VARIANTS BENCH_FILE_MB BENCH_TREE_N BENCH_CREATE_N \
    BENCH_UNTAR_N BENCH_REPS BENCH_OUT BENCH_SCRATCH BENCH_MOUNT_ARGS BENCH_LIBFUSE_SRC; do
    if [[ -n "${!v:-}" ]]; then CMD+="$v=$(printf '%q' "${!v}") "; fi
done
CMD+="bash bench/run.sh"
for a in "$@"; do CMD+=" $(printf '%q' "$a")"; done

QUICK=0
for a in "$@"; do
    case "$a" in
        --quick) QUICK=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $a" ;;
    esac
done

# scripts/env.sh sets CARGO_TARGET_DIR but also points FERRYFS_BIN at the *debug* binary:
# keep the caller's FERRYFS_BIN, and default to the release binary.
USER_BIN="${FERRYFS_BIN:-}"
if [[ -f "$ROOT/scripts/env.sh" ]]; then
    # shellcheck source=SCRIPTDIR/../scripts/env.sh
    source "$ROOT/scripts/env.sh"
fi
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/root/.cache/ferryfs/target}"
BIN="${USER_BIN:-$CARGO_TARGET_DIR/release/ferryfs}"
# A shell that sourced scripts/env.sh exports FERRYFS_BIN as the *debug* binary: figures from
# it are meaningless (and it happened once). Refuse it unless asked for on purpose.
if [[ "$BIN" == */debug/ferryfs && -z "${BENCH_ALLOW_DEBUG:-}" ]]; then
    die "FERRYFS_BIN=$BIN is a debug build; benchmarks measure the release binary (unset FERRYFS_BIN, or set BENCH_ALLOW_DEBUG=1 to measure it anyway)"
fi

if ((QUICK)); then
    FILE_MB="${BENCH_FILE_MB:-64}" TREE_N="${BENCH_TREE_N:-10000}" REPS="${BENCH_REPS:-1}"
    UNTAR_N="${BENCH_UNTAR_N:-5000}"
else
    FILE_MB="${BENCH_FILE_MB:-1024}" TREE_N="${BENCH_TREE_N:-100000}" REPS="${BENCH_REPS:-3}"
    UNTAR_N="${BENCH_UNTAR_N:-20000}"
fi
# Files whose first byte is timed: OLD-only in every ferryfs variant.
FIRSTBYTE_N=200
CREATE_N="${BENCH_CREATE_N:-10000}"
OUT="${BENCH_OUT:-$BENCH_DIR/results/latest.md}"
for n in FILE_MB TREE_N CREATE_N REPS UNTAR_N; do
    [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || die "$n must be a positive integer, got '${!n}'"
done
FILE_BYTES=$((FILE_MB * 1048576))
SIZE="${FILE_MB}m" # fio sizes are base 2: 1024m = 1 GiB
# smallfiles.py puts 1000 files per subdirectory.
TREE_ENTRIES=$((TREE_N + (TREE_N + 999) / 1000))

ALL_VARIANTS="plain bindfs mergerfs fuse-overlayfs unionfs-fuse ferryfs-old ferryfs-old-pt ferryfs-new"
LIBFUSE_SRC="${BENCH_LIBFUSE_SRC:-}"
DEFAULT_VARIANTS="$ALL_VARIANTS"
# Over io_uring when this kernel has it (the module parameter exists).
ALL_VARIANTS+=" ferryfs-old-uring"
[[ ! -e /sys/module/fuse/parameters/enable_uring ]] || DEFAULT_VARIANTS+=" ferryfs-old-uring"
ALL_VARIANTS+=" passthrough_hp passthrough_hp-uring"
[[ -z "$LIBFUSE_SRC" ]] || DEFAULT_VARIANTS+=" passthrough_hp passthrough_hp-uring"
VARIANTS=(plain)
for v in ${BENCH_VARIANTS:-$DEFAULT_VARIANTS}; do
    case " $ALL_VARIANTS " in *" $v "*) ;; *) die "unknown variant '$v' (known: $ALL_VARIANTS)" ;; esac
    if [[ "$v" == passthrough_hp* && -z "$LIBFUSE_SRC" ]]; then
        die "variant $v needs BENCH_LIBFUSE_SRC=<a libfuse source tree> (it is built from source)"
    fi
    [[ "$v" == plain ]] || VARIANTS+=("$v")
done
NEED_FERRYFS=0
case " ${VARIANTS[*]} " in *" ferryfs-"*) NEED_FERRYFS=1 ;; esac
NEED_PHP=0
case " ${VARIANTS[*]} " in *" passthrough_hp"*) NEED_PHP=1 ;; esac
NEED_URING=0
case " ${VARIANTS[*]} " in *"-uring "*) NEED_URING=1 ;; esac
URING_PARAM=/sys/module/fuse/parameters/enable_uring
URING_WAS="" # enable_uring's value before the run, put back on exit

# ---------------------------------------------------------------------------------------------
# Scratch dir, mounts and cleanup.

S="" # scratch dir; set once created
STEP="start-up"

# Mount points under the scratch dir, deepest first, as /proc/mounts lists them.
mounts_under() {
    [[ -n "$S" ]] || return 0
    awk -v p="$S/" 'index($2, p) == 1 { print length($2) "\t" $2 }' /proc/mounts |
        sort -rn | cut -f2-
}

is_listed_mount() { awk -v m="$1" '$2 == m { f = 1 } END { exit !f }' /proc/mounts; }

force_unmount() {
    local m="$1"
    case "$m" in
        */ferryfs-*) [[ -x "$BIN" ]] && timeout 120 "$BIN" unmount "$m" >/dev/null 2>&1 ;;
    esac
    is_listed_mount "$m" || return 0
    fusermount3 -u "$m" 2>/dev/null || fusermount3 -u -z "$m" 2>/dev/null || umount -l "$m"
}

cleanup() {
    local rc=$?
    set +e
    trap - INT TERM
    if [[ -n "$URING_WAS" ]]; then
        echo "$URING_WAS" >"$URING_PARAM" 2>/dev/null ||
            printf 'bench/run.sh: WARNING: could not put %s back to %s\n' "$URING_PARAM" "$URING_WAS" >&2
    fi
    if [[ -n "$S" && -d "$S" ]]; then
        if ((rc != 0)); then
            local f
            for f in "$S"/state-*/ferryfs.log; do
                [[ -s "$f" ]] || continue
                printf '\n---- last 30 lines of %s ----\n' "$f" >&2
                tail -n 30 "$f" >&2
            done
        fi
        local m
        while IFS= read -r m; do
            [[ -n "$m" ]] || continue
            force_unmount "$m" || printf 'bench/run.sh: WARNING: could not unmount %s\n' "$m" >&2
        done < <(mounts_under)
        # Never rm -rf through a mount point.
        if [[ -n "$(mounts_under)" ]]; then
            printf 'bench/run.sh: WARNING: still mounted under %s; leaving it in place\n' "$S" >&2
            ((rc != 0)) || rc=1
        else
            rm -rf --one-file-system -- "$S"
        fi
    fi
    if ((rc == 0)); then
        printf '\nbench/run.sh: PASS — results in %s\n' "$OUT"
    else
        printf '\nbench/run.sh: FAIL (exit %d) during: %s\n' "$rc" "$STEP" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Print a command's captured output files (after a failure).
show() {
    local f
    for f in "$@"; do
        [[ -s "$f" ]] || continue
        printf -- '---- %s ----\n' "$f" >&2
        tail -n 60 "$f" >&2
    done
}

# run NAME CMD...: run CMD with its output in $LOGS/NAME.{out,err}; on failure print both.
run() {
    local name="$1"
    shift
    if ! "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err"; then
        show "$LOGS/$name.out" "$LOGS/$name.err"
        die "$name failed: $*"
    fi
}

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
}

# ---------------------------------------------------------------------------------------------
# Checks.

STEP="checks"
((EUID == 0)) || die "must run as root (drop_caches, allow_other)"
missing=()
for t in fio bindfs fusermount3 python3 mountpoint findmnt timeout dd cp awk; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
for v in "${VARIANTS[@]}"; do
    case "$v" in
        mergerfs | fuse-overlayfs | unionfs-fuse) command -v "$v" >/dev/null 2>&1 || missing+=("$v") ;;
    esac
done
((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (bash scripts/setup.sh installs them)"
[[ -c /dev/fuse ]] || die "/dev/fuse is missing (in a container: --device /dev/fuse --cap-add SYS_ADMIN)"
(drop_caches) 2>/dev/null || die "cannot write /proc/sys/vm/drop_caches: cold numbers would be warm"
for f in seq_read_1g.fio seq_write_1g.fio rand_read_4k.fio; do
    [[ -f "$JOBS/$f" ]] || die "missing fio job $JOBS/$f"
done

if ((NEED_FERRYFS)) && [[ ! -x "$BIN" ]]; then
    STEP="cargo build --release"
    log "ferryfs binary not found at $BIN: building it (cargo build --release)"
    command -v cargo >/dev/null 2>&1 || die "cargo not found and no ferryfs binary at $BIN"
    (cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
    [[ -x "$BIN" ]] || die "no ferryfs binary at $BIN after the build (check FERRYFS_BIN / CARGO_TARGET_DIR)"
fi

# libfuse's passthrough_hp, built from the given source tree (again only when it changed).
PHP=""
if ((NEED_PHP)); then
    STEP="building libfuse's passthrough_hp"
    [[ -f "$LIBFUSE_SRC/example/passthrough_hp.cc" ]] ||
        die "BENCH_LIBFUSE_SRC=$LIBFUSE_SRC is not a libfuse source tree (no example/passthrough_hp.cc)"
    for t in meson ninja g++ pkg-config; do
        command -v "$t" >/dev/null 2>&1 ||
            die "$t is missing: passthrough_hp is built with meson and ninja (apt-get install meson ninja-build g++ pkg-config liburing-dev)"
    done
    LIBFUSE_BUILD="${BENCH_LIBFUSE_BUILD:-$HOME/.cache/ferryfs/libfuse-build}"
    if [[ ! -f "$LIBFUSE_BUILD/build.ninja" ]]; then
        mkdir -p "$(dirname "$LIBFUSE_BUILD")"
        meson setup --buildtype=release -Dexamples=true -Dtests=false -Dutils=false \
            "$LIBFUSE_BUILD" "$LIBFUSE_SRC" >"$LIBFUSE_BUILD.setup.log" 2>&1 ||
            die "meson setup of $LIBFUSE_SRC failed: $LIBFUSE_BUILD.setup.log"
    fi
    ninja -C "$LIBFUSE_BUILD" example/passthrough_hp >"$LIBFUSE_BUILD.ninja.log" 2>&1 ||
        die "building passthrough_hp failed: $LIBFUSE_BUILD.ninja.log"
    PHP="$LIBFUSE_BUILD/example/passthrough_hp"
    [[ -x "$PHP" ]] || die "no passthrough_hp at $PHP after the build"
    # It holds an O_PATH fd for every inode the kernel knows (raising its soft limit to the
    # hard one): the tree, or the untarred files, must fit under the hard limit.
    nofile="$(ulimit -Hn)"
    if [[ "$nofile" != unlimited ]] && ((TREE_N + UNTAR_N + 1000 > nofile)); then
        die "passthrough_hp needs an open file per entry it serves: the hard limit of open files here is $nofile, the tree and the untar need $((TREE_N + UNTAR_N + 1000)) (raise it: ulimit -Hn, or smaller BENCH_TREE_N/BENCH_UNTAR_N)"
    fi
    case " ${VARIANTS[*]} " in
        *" passthrough_hp-uring "*)
            grep -qs '^#define HAVE_URING' "$LIBFUSE_BUILD/fuse_config.h" ||
                die "libfuse was built without io_uring (liburing-dev missing at its meson setup?): install it and rm -rf $LIBFUSE_BUILD"
            ;;
    esac
fi
if ((NEED_URING)); then
    [[ -w "$URING_PARAM" ]] || die "$URING_PARAM is missing: this kernel has no FUSE over io_uring"
    URING_WAS="$(cat "$URING_PARAM")"
    echo Y >"$URING_PARAM" || die "cannot turn on $URING_PARAM"
fi

need_mb=$((FILE_MB * 3 + (TREE_N + CREATE_N) * 5 / 1000 + 512))
avail_mb=$(df -P -m /var/tmp | awk 'NR == 2 { print $4 }')
((avail_mb >= need_mb)) || die "/var/tmp has ${avail_mb} MiB free, need about ${need_mb} MiB"
mem_mb=$(awk '/^MemAvailable:/ { print int($2 / 1024) }' /proc/meminfo)
if ((mem_mb < FILE_MB * 3)); then
    log "WARNING: only ${mem_mb} MiB memory available; 'warm' reads of a ${FILE_MB} MiB file may not be warm"
fi

# ---------------------------------------------------------------------------------------------
# Data set.

STEP="creating the data set"
S="${BENCH_SCRATCH:-/var/tmp}/ferryfs-bench-$$"
[[ ! -e "$S" ]] || die "$S already exists"
mkdir -p "$S"
OLD="$S/old"
LOGS="$S/logs"
mkdir -p "$OLD" "$LOGS" "$S/mnt"
for v in "${VARIANTS[@]}"; do
    [[ "$v" == plain ]] || mkdir "$S/mnt/$v"
done
SAMPLES="$S/samples.tsv"
: >"$SAMPLES"

log "scratch dir $S ($(findmnt -no FSTYPE -T "$S") on $(findmnt -no SOURCE -T "$S"))"
# An ext4 without a journal skips inodes freed in the last minutes when it allocates, at a
# cost that lands on whichever variant creates files after another one deleted some: the
# plain directory's create, untar and rm -rf then come out 2-4x slower than on a journaled
# file system (docs/BENCHMARKS.md). Say so; the run goes on.
if [[ "$(findmnt -no FSTYPE -T "$S")" == ext[34] ]] && command -v debugfs >/dev/null &&
    [[ " $(debugfs -R features "$(findmnt -no SOURCE -T "$S")" 2>/dev/null) " != *" has_journal "* ]]; then
    log "WARNING: the scratch file system is an ext4 without a journal: create, untar and rm -rf"
    log "         figures will carry its recently-deleted allocator tax; BENCH_SCRATCH=DIR on a"
    log "         journaled file system avoids it (docs/BENCHMARKS.md shows a loop-file set-up)"
fi
log "OLD: ${FILE_MB} MiB file, ${TREE_N}-file tree; ${REPS} run(s) per cell; variants: ${VARIANTS[*]}"
run dd_big dd if=/dev/urandom of="$OLD/big.bin" bs=1M count="$FILE_MB" iflag=fullblock status=none
run tree_create python3 "$SMALLFILES" create "$OLD/tree" "$TREE_N"
run tree_check python3 "$SMALLFILES" stat "$OLD/tree"
got=$(python3 "$REPORT" kv "$(cat "$LOGS/tree_check.out")" entries)
((got == TREE_ENTRIES)) || die "tree has $got entries, expected $TREE_ENTRIES"
run untar_make python3 "$SMALLFILES" mktar "$S/untar.tar" "$UNTAR_N"
mkdir "$OLD/firstbyte"
for ((i = 0; i < FIRSTBYTE_N; i++)); do
    head -c 65536 /dev/urandom >"$OLD/firstbyte/f$i"
done

# ferryfs migrations: prepare with an empty NEW (the CLI requires it), and for ferryfs-new copy
# the big file into NEW before mounting so the view serves it from NEW.
for v in "${VARIANTS[@]}"; do
    case "$v" in
        mergerfs | fuse-overlayfs | unionfs-fuse)
            # Union peers: OLD read-only below, an empty NEW on top taking every write.
            mkdir "$S/new-$v" "$S/work-$v"
            ;;
        ferryfs-old | ferryfs-old-pt | ferryfs-new | ferryfs-old-uring)
            STEP="ferryfs prepare ($v)"
            mkdir "$S/new-$v"
            run "prepare-$v" "$BIN" prepare --old "$OLD" --new "$S/new-$v" --state "$S/state-$v"
            if [[ "$v" == ferryfs-new ]]; then
                run copy_to_new cp --reflink=never "$OLD/big.bin" "$S/new-$v/big.bin"
            fi
            ;;
    esac
done
sync

# ---------------------------------------------------------------------------------------------
# Mounting.

TARGET="" # the directory the workloads run in for the current variant

mount_variant() {
    local v="$1" mnt="$S/mnt/$1"
    STEP="mounting $v"
    case "$v" in
        plain) TARGET="$OLD"; return 0 ;;
        bindfs) run "mount-$v" bindfs -o allow_other "$OLD" "$mnt" ;;
        # The peers as ../shared/conformance/README.md mounts them (Debian 12 packages).
        mergerfs) run "mount-$v" mergerfs -o allow_other,category.create=ff "$S/new-$v=RW:$OLD=RO" "$mnt" ;;
        fuse-overlayfs) run "mount-$v" fuse-overlayfs -o "lowerdir=$OLD,upperdir=$S/new-$v,workdir=$S/work-$v,allow_other" "$mnt" ;;
        unionfs-fuse) run "mount-$v" unionfs-fuse -o cow,allow_other,use_ino "$S/new-$v=RW:$OLD=RO" "$mnt" ;;
        # shellcheck disable=SC2086 # BENCH_MOUNT_ARGS is a list of words
        ferryfs-old-pt) run "mount-$v" "$BIN" mount --state "$S/state-$v" "$mnt" -o allow_other --transport dev --passthrough all ${BENCH_MOUNT_ARGS:-} ;;
        # shellcheck disable=SC2086
        ferryfs-*-uring) run "mount-$v" "$BIN" mount --state "$S/state-$v" "$mnt" -o allow_other --transport uring ${BENCH_MOUNT_ARGS:-} ;;
        # shellcheck disable=SC2086
        ferryfs-*) run "mount-$v" "$BIN" mount --state "$S/state-$v" "$mnt" -o allow_other --transport dev ${BENCH_MOUNT_ARGS:-} ;;
        # (It goes to the background once mounted, as bindfs does.)
        passthrough_hp) run "mount-$v" env -u FUSE_URING_ENABLE "$PHP" -o allow_other "$OLD" "$mnt" ;;
        passthrough_hp-uring) run "mount-$v" env FUSE_URING_ENABLE=1 "$PHP" -o allow_other "$OLD" "$mnt" ;;
    esac
    mountpoint -q "$mnt" || die "$v: $mnt is not a mount point after mounting"
    if [[ "$v" == *-uring ]]; then
        # Its io_uring rings, or it is not what the column says.
        local pid
        case "$v" in
            passthrough_hp-uring) pid="$(pgrep -nf "passthrough_hp.* $mnt\$")" ;;
            *) pid="$(pgrep -nf "ferryfs mount --state $S/state-$v ")" ;;
        esac
        [[ -n "$pid" ]] || die "$v: its process is not found"
        [[ "$(find "/proc/$pid/fd" -lname 'anon_inode:\[io_uring\]' 2>/dev/null | wc -l)" -gt 0 ]] ||
            die "$v: pid $pid serves without io_uring (kernel or the FUSE library refused it)"
    fi
    TARGET="$mnt"
}

unmount_variant() {
    local v="$1" mnt="$S/mnt/$1"
    STEP="unmounting $v"
    case "$v" in
        plain) return 0 ;;
        bindfs | mergerfs | fuse-overlayfs | unionfs-fuse | passthrough_hp*) run "unmount-$v" fusermount3 -u "$mnt" ;;
        ferryfs-*) run "unmount-$v" timeout 120 "$BIN" unmount "$mnt" ;;
    esac
    ! is_listed_mount "$mnt" || die "$v: $mnt is still mounted after unmounting"
}

# ---------------------------------------------------------------------------------------------
# Workloads. Each records "key variant run value" in $SAMPLES.

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SAMPLES"; }

# fio_job NAME JOB FILE DIR METRIC [FIO ARGS...]: run one fio job, print the metric.
fio_job() {
    local name="$1" job="$2" file="$3" ddir="$4" metric="$5" out val
    local -a expect=()
    shift 5
    out="$LOGS/$name.json"
    # Sequential jobs must move exactly the whole file; the time-based random job does not.
    [[ "$job" == rand_read_4k*.fio ]] || expect=("$FILE_BYTES")
    if ! FILE="$file" SIZE="$SIZE" fio "$@" --output-format=json --output="$out" "$JOBS/$job" \
        >"$LOGS/$name.out" 2>"$LOGS/$name.err"; then
        show "$out" "$LOGS/$name.out" "$LOGS/$name.err"
        die "fio $job on $file failed"
    fi
    if ! val=$(python3 "$REPORT" fio "$out" "$ddir" "$metric" "${expect[@]}"); then
        show "$LOGS/$name.out" "$LOGS/$name.err"
        die "fio $job on $file: bad result"
    fi
    printf '%s\n' "$val"
}

# smallfiles NAME ARGS...: run smallfiles.py, print its output line.
smallfiles() {
    local name="$1"
    shift
    run "$name" python3 "$SMALLFILES" "$@"
    cat "$LOGS/$name.out"
}

# smallfiles_checked KEY V R COUNT_KEY WANT VAL_KEY NAME ARGS...: run smallfiles.py, fail
# unless its COUNT_KEY is WANT, record its VAL_KEY as sample KEY of variant V run R, print it.
smallfiles_checked() {
    local key="$1" v="$2" r="$3" count_key="$4" want="$5" val_key="$6" line n val
    shift 6
    line=$(smallfiles "$@")
    n=$(python3 "$REPORT" kv "$line" "$count_key")
    ((n == want)) || die "$v: $1 saw $count_key=$n, expected $want"
    val=$(python3 "$REPORT" kv "$line" "$val_key")
    record "$key" "$v" "$r" "$val"
    printf '%s\n' "$val"
}

bench_variant() {
    local v="$1" r="$2" tag="$1.run$2" t line n val
    log "== run $r/$REPS: $v =="
    mount_variant "$v"
    t="$TARGET"

    STEP="$v run $r: checking the view"
    [[ -f "$t/big.bin" ]] || die "$v: $t/big.bin is missing"
    n=$(stat -c %s "$t/big.bin")
    ((n == FILE_BYTES)) || die "$v: $t/big.bin is $n bytes, expected $FILE_BYTES"
    [[ ! -e "$t/bench-write.bin" && ! -e "$t/bench-create" ]] ||
        die "$v: leftovers of an earlier run in $t"

    # First, right after the mount: the copier (running, default limits) has had the least
    # time to copy these files, so in the ferryfs variants most are still OLD-only.
    STEP="$v run $r: first byte of files not read yet, cold"
    drop_caches
    val=$(smallfiles_checked first_byte "$v" "$r" files "$FIRSTBYTE_N" median_ms \
        "firstbyte.$tag" firstbyte "$t/firstbyte")
    log "$v run $r: first byte: $val ms (median)"

    STEP="$v run $r: stat tree, cold"
    drop_caches
    val=$(smallfiles_checked stat_cold "$v" "$r" entries "$TREE_ENTRIES" seconds \
        "stat-cold.$tag" stat "$t/tree")
    log "$v run $r: stat cold: $val s"

    STEP="$v run $r: stat tree, warm"
    val=$(smallfiles_checked stat_warm "$v" "$r" entries "$TREE_ENTRIES" seconds \
        "stat-warm.$tag" stat "$t/tree")
    log "$v run $r: stat warm: $val s"

    STEP="$v run $r: ls -lR tree, warm"
    # ls -l asks each entry's xattrs (security label, ACL) besides its attributes: one unmeasured
    # listing warms what a FUSE view can keep.
    smallfiles "lslr-warmup.$tag" lslr "$t/tree" >/dev/null
    val=$(smallfiles_checked ls_lr_warm "$v" "$r" entries "$TREE_ENTRIES" seconds \
        "lslr.$tag" lslr "$t/tree")
    log "$v run $r: ls -lR warm: $val s"

    STEP="$v run $r: seq read, cold"
    drop_caches
    val=$(fio_job "seq-read-cold.$tag" seq_read_1g.fio "$t/big.bin" read mibs --readonly)
    record seq_read_cold "$v" "$r" "$val"
    log "$v run $r: seq read cold: $val MiB/s"

    STEP="$v run $r: seq read, warm"
    fio_job "seq-read-warmup.$tag" seq_read_1g.fio "$t/big.bin" read mibs --readonly >/dev/null
    val=$(fio_job "seq-read-warm.$tag" seq_read_1g.fio "$t/big.bin" read mibs --readonly)
    record seq_read_warm "$v" "$r" "$val"
    log "$v run $r: seq read warm: $val MiB/s"

    STEP="$v run $r: 4 KiB random read, warm"
    val=$(fio_job "rand-read.$tag" rand_read_4k.fio "$t/big.bin" read iops --readonly)
    record rand_read_4k "$v" "$r" "$val"
    log "$v run $r: rand read 4k: $val IOPS"

    STEP="$v run $r: 4 KiB random read, warm, QD16"
    val=$(fio_job "rand-read-qd16.$tag" rand_read_4k_qd16.fio "$t/big.bin" read iops --readonly)
    record rand_read_4k_qd16 "$v" "$r" "$val"
    log "$v run $r: rand read 4k QD16: $val IOPS"

    STEP="$v run $r: seq write"
    val=$(fio_job "seq-write.$tag" seq_write_1g.fio "$t/bench-write.bin" write mibs)
    n=$(stat -c %s "$t/bench-write.bin")
    ((n == FILE_BYTES)) || die "$v: wrote a $n-byte file, expected $FILE_BYTES"
    rm -- "$t/bench-write.bin"
    record seq_write "$v" "$r" "$val"
    log "$v run $r: seq write: $val MiB/s"

    STEP="$v run $r: create small files"
    sync
    line=$(smallfiles "create.$tag" create "$t/bench-create" "$CREATE_N")
    val=$(python3 "$REPORT" kv "$line" seconds)
    rm -rf -- "$t/bench-create"
    record create "$v" "$r" "$val"
    log "$v run $r: create $CREATE_N files: $val s"

    STEP="$v run $r: untar small files"
    sync
    line=$(smallfiles "untar.$tag" untar "$S/untar.tar" "$t/bench-untar")
    val=$(python3 "$REPORT" kv "$line" seconds)
    n=$(find "$t/bench-untar" -type f | wc -l)
    ((n == UNTAR_N)) || die "$v: untar left $n files, expected $UNTAR_N"
    record untar "$v" "$r" "$val"
    log "$v run $r: untar $UNTAR_N files: $val s"

    STEP="$v run $r: rm -rf the untarred tree"
    sync
    line=$(smallfiles "rmtree.$tag" rmtree "$t/bench-untar")
    val=$(python3 "$REPORT" kv "$line" seconds)
    [[ ! -e "$t/bench-untar" ]] || die "$v: rm -rf left $t/bench-untar"
    record rm_rf "$v" "$r" "$val"
    log "$v run $r: rm -rf $UNTAR_N files: $val s"

    unmount_variant "$v"
    sync
}

# ---------------------------------------------------------------------------------------------
# Run.

started=$(date +%s)
for ((r = 1; r <= REPS; r++)); do
    for v in "${VARIANTS[@]}"; do
        bench_variant "$v" "$r"
    done
done
elapsed=$(($(date +%s) - started))

# ---------------------------------------------------------------------------------------------
# Report.

STEP="writing the report"
if ((FILE_MB % 1024 == 0)); then human="$((FILE_MB / 1024)) GiB"; else human="$FILE_MB MiB"; fi
SPEC="$S/spec.tsv"
{
    printf 'seq_read_cold\tmibs\tseq read %s, cold, bs=1M (MiB/s)\n' "$human"
    printf 'seq_read_warm\tmibs\tseq read %s, warm, bs=1M (MiB/s)\n' "$human"
    printf 'seq_write\tmibs\tseq write %s + fsync, bs=1M (MiB/s)\n' "$human"
    printf 'rand_read_4k\tiops\trand read 4 KiB, warm, QD1, 10 s (IOPS)\n'
    printf 'rand_read_4k_qd16\tiops\trand read 4 KiB, warm, QD16 io_uring, 10 s (IOPS)\n'
    printf 'first_byte\tsecs\tfirst byte of a 64 KiB file, cold, median of %d (ms)\n' "$FIRSTBYTE_N"
    printf 'create\tsecs\tcreate %d files of 4 KiB (s)\n' "$CREATE_N"
    printf 'untar\tsecs\tuntar %d files of 1-8 KiB (s)\n' "$UNTAR_N"
    printf 'rm_rf\tsecs\trm -rf of those %d files (s)\n' "$UNTAR_N"
    printf 'stat_cold\tsecs\tstat %d entries, cold (s)\n' "$TREE_ENTRIES"
    printf 'stat_warm\tsecs\tstat %d entries, warm (s)\n' "$TREE_ENTRIES"
    printf 'ls_lr_warm\tsecs\tls -lR of those entries, warm (s)\n'
} >"$SPEC"
TABLE="$S/table.md"
python3 "$REPORT" table "$SPEC" "$SAMPLES" "${VARIANTS[@]}" >"$TABLE" || die "report.py table failed"

if [[ -x "$BIN" ]] && ((NEED_FERRYFS)); then
    ferry_version="$("$BIN" --version 2>&1 | head -n 1) ($BIN)"
else
    ferry_version="not used"
fi
git_rev="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)"
if [[ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null | head -n 1)" ]]; then git_rev+=" (dirty)"; fi

mkdir -p "$(dirname "$OUT")"
{
    printf '# ferryfs benchmark results\n\n'
    printf -- '- date: %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    # shellcheck disable=SC2016 # literal backticks: Markdown code
    printf -- '- command: `%s` (in %s)\n' "$CMD" "$ROOT"
    printf -- '- kernel: %s\n' "$(uname -srvm)"
    printf -- '- machine: %s CPUs (%s), %s MiB RAM\n' "$(nproc)" \
        "$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
        "$(awk '/^MemTotal:/ { print int($2 / 1024) }' /proc/meminfo)"
    printf -- '- scratch file system: %s on %s (%s)\n' \
        "$(findmnt -no FSTYPE -T "$(dirname "$S")")" "$(findmnt -no SOURCE -T "$(dirname "$S")")" "$(dirname "$S")"
    printf -- '- ferryfs: %s, git %s\n' "$ferry_version" "$git_rev"
    printf -- '- %s; %s; %s\n' "$(bindfs --version 2>&1 | head -n 1)" "$(fio --version)" "$(python3 --version)"
    printf -- '- peers: %s; %s; %s\n' "$(mergerfs --version 2>&1 | head -n 1)" \
        "$(fuse-overlayfs --version 2>&1 | grep -m 1 '^fuse-overlayfs')" \
        "unionfs-fuse with $(unionfs-fuse --version 2>&1 | grep -m 1 '^FUSE library')"
    if ((NEED_PHP)); then
        printf -- '- libfuse passthrough_hp: %s (version %s%s), built in %s\n' "$LIBFUSE_SRC" \
            "$(sed -n "s/^ *version *: *'\([^']*\)'.*/\1/p" "$LIBFUSE_SRC/meson.build" | head -n 1)" \
            "$(git -C "$LIBFUSE_SRC" rev-parse --short HEAD 2>/dev/null | sed 's/^/, git /')" "$LIBFUSE_BUILD"
    fi
    printf -- '- runs per cell: %d (cells are medians); wall time %d s\n\n' "$REPS" "$elapsed"
    cat "$TABLE"
    printf '\n'
    cat <<'EOF'
Higher "x plain" is better: variant/plain for MiB/s and IOPS, plain/variant for seconds
(the ratio of ops/s). plain = the OLD directory itself; bindfs = bindfs of OLD; mergerfs,
fuse-overlayfs, unionfs-fuse = union of an empty NEW (writes) over OLD (read-only);
passthrough_hp, passthrough_hp-uring = libfuse's high-performance pass-through example over
OLD, over /dev/fuse and over FUSE io_uring (enable_uring on for the run);
ferryfs-old = the view reading files that are only in OLD (default `--passthrough new`: through
the daemon); ferryfs-old-pt = the same with `--passthrough all` (the kernel reads OLD's file
itself); ferryfs-old-uring = ferryfs-old served over FUSE io_uring (`--transport uring`; the
other ferryfs columns use `--transport dev`); ferryfs-new = a view whose NEW
holds a copy of the big file (stat still runs over the OLD tree; writes and creates land in
NEW for both ferryfs variants). Every variant is mounted afresh for each run. "cold" =
`sync; echo 3 > /proc/sys/vm/drop_caches` just before; "warm" seq read = measured right
after an unmeasured read of the same file; random reads follow the warm seq reads. Writes
and creates go to a new name and are deleted afterwards.
EOF
} >"$OUT.tmp"
mv -f -- "$OUT.tmp" "$OUT"

printf '\n'
cat "$TABLE"
