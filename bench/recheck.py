#!/usr/bin/env python3
"""The cost of following OLD behind the view: one copier pass over an executed migration.

    python3 bench/recheck.py [--files N] [--reps R] [--scratch DIR]

Once a migration is executed, every copier pass (a recheck every --recheck-interval, each
`execute`, commit's final pass) walks the whole view and checks every copy against OLD: OLD's
entry looked up again (a removal, a rename, a change behind the view), NEW's entry and its copy
record, the journal's origin of entries the view changed. This measures that pass on N files
(default 200,000 in 200 directories, 1 KiB each) on the scratch file system, warm caches, and
puts beside it what a peer needs for the same question: `rsync -a --dry-run --delete OLD/ NEW/`
(a stat of both trees and a comparison, nothing copied), in the same run, interleaved.
Prints a Markdown table (medians of --reps, default 3) with seconds per million entries, and
writes it to bench/results/recheck-latest.md.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ferryfs_bin():
    b = os.environ.get("FERRYFS_BIN")
    if b:
        return b
    target = os.environ.get("CARGO_TARGET_DIR", "/root/.cache/ferryfs/target")
    return os.path.join(target, "release", "ferryfs")


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def last_pass(log):
    """(entries checked, seconds) of the last copier pass in the daemon's log."""
    found = None
    with open(log) as f:
        for line in f:
            if "copier pass done" in line:
                present = re.search(r"present: (\d+)", line)
                secs = re.search(r"secs=([0-9.]+)", line)
                if present and secs:
                    found = (int(present.group(1)), float(secs.group(1)))
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scratch", default="/var/tmp")
    a = ap.parse_args()
    fb = ferryfs_bin()
    if not os.access(fb, os.X_OK):
        sys.exit(f"ferryfs binary not found at {fb} (cargo build --release, or set FERRYFS_BIN)")
    if not shutil.which("rsync"):
        sys.exit("rsync not found (scripts/setup.sh installs it)")
    work = tempfile.mkdtemp(prefix="ferryfs-recheck-", dir=a.scratch)
    old, new, state, mnt = (os.path.join(work, d) for d in ("old", "new", "state", "mnt"))
    for d in (old, new, mnt):
        os.makedirs(d)
    per = 1000
    for i in range(a.files):
        d = os.path.join(old, f"d{i // per:04}")
        if i % per == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i % per:04}"), "wb") as f:
            f.write(b"x" * 1024)
    log = os.path.join(state, "ferryfs.log")
    try:
        run(fb, "prepare", "--old", old, "--new", new, "--state", state)
        run(fb, "mount", "--state", state, mnt)
        run(fb, "execute", "--state", state, "--wait")
        ferry, rsync = [], []
        for _ in range(a.reps):
            before = last_pass(log)
            run(fb, "execute", "--state", state, "--wait")
            deadline = time.time() + 600
            while last_pass(log) == before and time.time() < deadline:
                time.sleep(0.2)
            entries, secs = last_pass(log)
            ferry.append(secs)
            t = time.monotonic()
            run("rsync", "-a", "--dry-run", "--delete", old + "/", new + "/")
            rsync.append(time.monotonic() - t)
        entries = last_pass(log)[0]
    finally:
        subprocess.run([fb, "unmount", mnt], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    f, r = statistics.median(ferry), statistics.median(rsync)
    per_m = lambda s: s * 1_000_000 / entries
    out = [
        f"# One copier pass over an executed migration ({entries} entries checked, "
        f"{a.files} files of 1 KiB, {a.scratch})",
        "",
        f"`python3 bench/recheck.py --files {a.files} --reps {a.reps}`, "
        f"{time.strftime('%Y-%m-%d')}, kernel {os.uname().release}, medians of {a.reps}",
        "",
        "| what | seconds | seconds per million entries | x rsync |",
        "|---|---|---|---|",
        f"| ferryfs copier pass (check every copy against OLD) | {f:.2f} | {per_m(f):.1f} | {r / f:.2f} |",
        f"| `rsync -a --dry-run --delete OLD/ NEW/` | {r:.2f} | {per_m(r):.1f} | 1.00 |",
        "",
        f"runs (s): ferryfs {', '.join(f'{x:.2f}' for x in ferry)}; "
        f"rsync {', '.join(f'{x:.2f}' for x in rsync)}",
    ]
    text = "\n".join(out) + "\n"
    print(text)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "recheck-latest.md"), "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
