#!/usr/bin/env python3
"""The first change to a big OLD-only file: how long the application waits.

    python3 bench/firstchange.py [--sizes 64M,1G,8G] [--reps R] [--scratch DIR]
                                 [--bins NAME=PATH,...]

For each size, a file of real data (no holes) is made in OLD; then, through a freshly mounted
view (`--no-copy`: nothing copies the file meanwhile), each of these is timed from the system
call to its return, page cache dropped before each:
  - `write`: open(O_WRONLY) plus one 4 KiB pwrite in the middle of the file (what a database
    or a VM image does first); since issue 25 the open makes a partial NEW file (no data) and
    the write copies the chunk it touches (`prepare --chunk-size`, 1 MiB by default; a build
    before that copied the whole file at the open);
  - `chmod`: chmod 0600 of the file (a metadata change: recorded, no data copied, since issue
    25's metacopy).
The same calls on the plain directory are the baseline. `cbw floor` is the least any durable
copy-before-write of a 1 MiB chunk must do on this machine, without FUSE or a journal: the
open makes a sparse file of OLD's size (O_TMPFILE, ftruncate, fsync, linkat, fsync of the
directory), the write reads the chunk from OLD, writes and fdatasyncs it, then writes the
4 KiB (same page-cache drop before it). With `--fio SIZE` (issue 25's job: 2G),
also an fio job on an OLD-only file of SIZE through a fresh view: 4 KiB random writes, QD1,
`--fio-secs` (30) seconds, its IOPS and p99 completion latency against the plain directory
(fio opens the file before its clock starts: the copy-up an open makes is not in these rows). Several ferryfs builds can be compared
in one run (`--bins before=/path,after=/path`, default: FERRYFS_BIN or the release build);
rounds are interleaved build by build. Prints a Markdown table of medians (ms) and writes it
to bench/results/firstchange-latest.md.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20


def default_bin():
    b = os.environ.get("FERRYFS_BIN")
    if b:
        return b
    target = os.environ.get("CARGO_TARGET_DIR", "/root/.cache/ferryfs/target")
    return os.path.join(target, "release", "ferryfs")


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def size_of(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def make_file(path, size):
    """Real data: a random MiB, each copy stamped with its index (no two MiB alike)."""
    block = bytearray(os.urandom(MIB))
    with open(path, "wb") as f:
        for i in range(size // MIB):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed_write(path, size):
    drop_caches()
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"w" * 4096, size // 2)
    dt = time.perf_counter() - t
    os.close(fd)
    return dt


def timed_chmod(path):
    drop_caches()
    t = time.perf_counter()
    os.chmod(path, 0o600)
    return time.perf_counter() - t


def timed_floor(old_file, scratch, size):
    """The copy-before-write floor (see the module doc): seconds for the open and the write."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    d = os.path.join(scratch, "floor")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    drop_caches()
    t = time.perf_counter()
    o = os.open(old_file, os.O_RDONLY)
    fd = os.open(d, os.O_TMPFILE | os.O_RDWR, 0o600)
    os.ftruncate(fd, size)
    os.fsync(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    if libc.linkat(fd, b"", dfd, b"w.bin", 0x1000) != 0:  # AT_EMPTY_PATH
        raise OSError(ctypes.get_errno(), "linkat")
    os.fsync(dfd)
    os.close(dfd)
    off = size // 2 // MIB * MIB
    chunk = os.pread(o, MIB, off)
    os.pwrite(fd, chunk, off)
    os.fdatasync(fd)
    os.pwrite(fd, b"x" * 4096, size // 2)
    el = time.perf_counter() - t
    os.close(fd)
    os.close(o)
    shutil.rmtree(d, ignore_errors=True)
    return el


def one_round(binary, old, scratch, size):
    """Fresh migration over `old`: (write, chmod) seconds through the view."""
    new = os.path.join(scratch, "new")
    state = os.path.join(scratch, "state")
    mnt = os.path.join(scratch, "mnt")
    for d in (new, state):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(new)
    os.makedirs(mnt, exist_ok=True)
    run(binary, "prepare", "--old", old, "--new", new, "--state", state)
    run(binary, "mount", "--state", state, mnt, "--no-copy")
    try:
        w = timed_write(os.path.join(mnt, "w.bin"), size)
        c = timed_chmod(os.path.join(mnt, "c.bin"))
    finally:
        run(binary, "unmount", mnt)
    return w, c


def fio_job(path, secs):
    """fio 4 KiB random writes at QD1 on `path`: (IOPS, p99 latency in ms)."""
    out = run("fio", "--name=randwrite", f"--filename={path}", "--rw=randwrite", "--bs=4k",
              "--iodepth=1", "--ioengine=psync", f"--runtime={secs}", "--time_based",
              "--output-format=json").stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    p99 = job["clat_ns"]["percentile"]["99.000000"] / 1e6
    return job["iops"], p99


def fio_rows(bins, size_arg, secs, scratch_root):
    size = size_of(size_arg)
    scratch = tempfile.mkdtemp(prefix="ferryfs-firstchange-fio-", dir=scratch_root)
    try:
        old = os.path.join(scratch, "old")
        os.makedirs(old)
        make_file(os.path.join(old, "f.bin"), size)
        rows = [("plain",) + fio_job(os.path.join(old, "f.bin"), secs)]
        for name, b in bins:
            work = os.path.join(scratch, "run")
            new, state, mnt = (os.path.join(work, d) for d in ("new", "state", "mnt"))
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(new)
            os.makedirs(mnt)
            run(b, "prepare", "--old", old, "--new", new, "--state", state)
            run(b, "mount", "--state", state, mnt, "--no-copy")
            try:
                rows.append((name,) + fio_job(os.path.join(mnt, "f.bin"), secs))
            finally:
                run(b, "unmount", mnt)
        text = (f"\nfio on an OLD-only file of {size_arg}: 4 KiB random writes, QD1 (psync), "
                f"{secs} s\n\n| | IOPS | p99 (ms) |\n|---|---:|---:|\n")
        text += "".join(f"| {n} | {iops:.0f} | {p99:.3f} |\n" for n, iops, p99 in rows)
        return text
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64M,1G,8G")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scratch", default="/var/tmp")
    ap.add_argument("--bins", default="")
    ap.add_argument("--fio", default="", help="also the fio job on a file of this size (2G)")
    ap.add_argument("--fio-secs", type=int, default=30)
    ap.add_argument("--no-latency", action="store_true", help="only the fio job")
    a = ap.parse_args()
    bins = [b.split("=", 1) for b in a.bins.split(",") if b] or [["ferryfs", default_bin()]]
    for name, b in bins:
        if not os.access(b, os.X_OK):
            sys.exit(f"firstchange: no ferryfs binary for {name} at {b} (build it: cargo build --release)")
    rows = []
    for s in ([] if a.no_latency else a.sizes.split(",")):
        size = size_of(s)
        scratch = tempfile.mkdtemp(prefix="ferryfs-firstchange-", dir=a.scratch)
        try:
            old = os.path.join(scratch, "old")
            os.makedirs(old)
            for n in ("w.bin", "c.bin"):
                make_file(os.path.join(old, n), size)
            plain = {"write": [], "chmod": [], "floor": []}
            got = {name: {"write": [], "chmod": []} for name, _ in bins}
            for r in range(a.reps):
                # The plain directory: a scratch copy would cost as much as a copy-up, so the
                # calls run on OLD's own files (the chmod is undone after).
                plain["write"].append(timed_write(os.path.join(old, "w.bin"), size))
                plain["chmod"].append(timed_chmod(os.path.join(old, "c.bin")))
                os.chmod(os.path.join(old, "c.bin"), 0o644)
                plain["floor"].append(timed_floor(os.path.join(old, "w.bin"), scratch, size))
                for name, b in bins:
                    w, c = one_round(b, old, os.path.join(scratch, "run"), size)
                    got[name]["write"].append(w)
                    got[name]["chmod"].append(c)
                    print(f"[firstchange] {s} round {r + 1} {name}: write {w * 1e3:.2f} ms, chmod {c * 1e3:.2f} ms",
                          file=sys.stderr)
            med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
            row = [s, f"{med(plain['write']):.2f}", f"{med(plain['chmod']):.2f}",
                   f"{med(plain['floor']):.2f}"]
            for name, _ in bins:
                row += [f"{med(got[name]['write']):.2f}", f"{med(got[name]['chmod']):.2f}"]
            rows.append(row)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    head = ["size", "plain write", "plain chmod", "cbw floor write"]
    for name, _ in bins:
        head += [f"{name} write", f"{name} chmod"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    text = "" if not rows else (
        f"First change to an OLD-only file, ms to the call's return (median of {a.reps}, "
        "page cache dropped before each; write = open O_WRONLY + 4 KiB pwrite in the middle)\n\n"
        + "\n".join(out) + "\n"
    )
    if a.fio:
        text += fio_rows(bins, a.fio, a.fio_secs, a.scratch)
    print(text)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "firstchange-latest.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
