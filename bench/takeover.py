#!/usr/bin/env python3
"""bench/takeover.py - what applications feel of a restart without unmount.

    python3 bench/takeover.py [--rounds N]      (as root; FERRYFS_BIN as for run.sh)

A reader (4 KiB preads of an OLD-only file held open, served by the daemon, plus an
open-read-close of a NEW file the kernel passes through) and a writer (appends to a file held
open, fsync every 16 lines, and a create+rename per line) run for a baseline period, then
across N `mount --takeover` restarts. Prints the takeover command's wall time and the
applications' per-operation latency (p50, p99, max) without and with restarts, and the count of
errors (must be 0). Writes the table to bench/results/takeover.md.
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ferryfs_bin():
    b = os.environ.get("FERRYFS_BIN")
    if b:
        return b
    target = os.environ.get("CARGO_TARGET_DIR", "/root/.cache/ferryfs/target")
    return os.path.join(target, "release", "ferryfs")


class Load:
    def __init__(self, mnt):
        self.mnt = mnt
        self.stop = False
        self.lat = []  # (start time, seconds, kind)
        self.errors = []
        self.lock = threading.Lock()

    def note(self, t0, kind):
        d = time.monotonic() - t0
        with self.lock:
            self.lat.append((t0, d, kind))

    def reader(self):
        fd = os.open(os.path.join(self.mnt, "big"), os.O_RDONLY)
        size = os.fstat(fd).st_size
        rnd = random.Random(1)
        while not self.stop:
            off = rnd.randrange(0, size // 4096) * 4096
            t0 = time.monotonic()
            try:
                if len(os.pread(fd, 4096, off)) != 4096:
                    self.errors.append(f"short read at {off}")
            except OSError as e:
                self.errors.append(f"pread: {e}")
            self.note(t0, "read")
            t0 = time.monotonic()
            try:
                with open(os.path.join(self.mnt, "log"), "rb") as f:
                    f.read(4096)
            except OSError as e:
                self.errors.append(f"open log: {e}")
            self.note(t0, "open")
        os.close(fd)

    def writer(self):
        log = os.open(os.path.join(self.mnt, "log"), os.O_WRONLY | os.O_APPEND)
        n = 0
        while not self.stop:
            t0 = time.monotonic()
            try:
                os.write(log, b"line %d\n" % n)
                if n % 16 == 0:
                    os.fdatasync(log)
                tmp = os.path.join(self.mnt, "w", "t%d" % (n % 8))
                with open(tmp, "wb") as f:
                    f.write(b"x")
                os.rename(tmp, os.path.join(self.mnt, "w", "d%d" % (n % 8)))
            except OSError as e:
                self.errors.append(f"write {n}: {e}")
            self.note(t0, "write")
            n += 1
        os.close(log)


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    b = ferryfs_bin()
    if not os.path.exists(b):
        sys.exit(f"no ferryfs binary at {b}: cargo build --release, or set FERRYFS_BIN")
    if "/debug/" in b and not os.environ.get("BENCH_ALLOW_DEBUG"):
        sys.exit(f"{b} is a debug build: measure a release build (or set BENCH_ALLOW_DEBUG)")
    d = Path(tempfile.mkdtemp(prefix="ferryfs-takeover-", dir="/var/tmp"))
    old, new, state, mnt = d / "old", d / "new", d / "state", d / "mnt"
    for p in (old, new, mnt):
        p.mkdir()
    with open(old / "big", "wb") as f:
        f.write(os.urandom(64 << 20))
    run = lambda *args: subprocess.run([b, *map(str, args)], check=True, capture_output=True, text=True)
    mount = [b, "mount", "--state", str(state), str(mnt), "-o", "allow_other", "--no-copy"]
    try:
        run("prepare", "--old", old, "--new", new, "--state", state)
        subprocess.run(mount, check=True)
        (mnt / "w").mkdir()
        (mnt / "log").write_bytes(b"")
        load = Load(str(mnt))
        threads = [threading.Thread(target=load.reader), threading.Thread(target=load.writer)]
        for t in threads:
            t.start()
        time.sleep(3)
        base_end = time.monotonic()
        took = []
        windows = []
        for _ in range(a.rounds):
            t0 = time.monotonic()
            subprocess.run(mount + ["--takeover"], check=True)
            t1 = time.monotonic()
            took.append(t1 - t0)
            windows.append((t0, t1))
            time.sleep(0.5)
        load.stop = True
        for t in threads:
            t.join()
        subprocess.run([b, "unmount", str(mnt)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)

    base = [x for (s, x, _) in load.lat if s < base_end]
    # Operations that started during a takeover command, or were in flight when it began.
    during = [x for (s, x, _) in load.lat if any(s <= w1 and s + x >= w0 for (w0, w1) in windows)]
    ms = lambda v: f"{v * 1000:.2f}"
    lines = [
        f"# Restart without unmount ({time.strftime('%Y-%m-%d %H:%M')}, {os.uname().release}, {a.rounds} rounds)",
        "",
        f"`mount --takeover` wall time: median {ms(statistics.median(took))} ms, max {ms(max(took))} ms",
        "",
        "| application operations | count | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
        f"| baseline (no restart, 3 s) | {len(base)} | {ms(pct(base, .5))} | {ms(pct(base, .99))} | {ms(max(base))} |",
        f"| overlapping a takeover | {len(during)} | {ms(pct(during, .5))} | {ms(pct(during, .99))} | {ms(max(during)) if during else 'n/a'} |",
        "",
        f"errors seen by the applications: {len(load.errors)}",
    ]
    lines += [f"- {e}" for e in load.errors[:10]]
    out = "\n".join(lines) + "\n"
    print(out)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "takeover.md").write_text(out)
    if load.errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
