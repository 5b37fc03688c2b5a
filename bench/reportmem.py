#!/usr/bin/env python3
"""Peak memory of `ferryfs report` as the migration grows: it must stay flat.

    python3 bench/reportmem.py [--sizes 100000,1000000] [--scratch DIR]

For each size N, a NEW holding N files (1,000 a directory) is prepared with an empty OLD
(`--allow-nonempty-new`, so every entry is classified through the journal: copy record,
origin record and digest looked up for each), then `ferryfs report --state S` streams every
record to /dev/null. Its peak RSS (getrusage of the child), its time and the records written
are printed beside `find NEW -printf '%p %s\\n'` over the same tree (a streaming walk, the
floor), in the same run. Writes a Markdown table to bench/results/reportmem-latest.md.
"""
import argparse
import os
import resource
import shutil
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


def measured(cmd):
    """(seconds, peak RSS in MiB, lines written) of one child run, stdout counted."""
    t = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = 0
    for chunk in iter(lambda: p.stdout.read(1 << 20), b""):
        lines += chunk.count(b"\n")
    err = p.stderr.read()
    _, status, ru = os.wait4(p.pid, 0)
    secs = time.monotonic() - t
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd[0]} failed: {err.decode(errors='replace')}")
    return secs, ru.ru_maxrss / 1024, lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--scratch", default="/var/tmp")
    a = ap.parse_args()
    fb = ferryfs_bin()
    if not os.access(fb, os.X_OK):
        sys.exit(f"ferryfs binary not found at {fb} (cargo build --release, or set FERRYFS_BIN)")
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        work = tempfile.mkdtemp(prefix="ferryfs-reportmem-", dir=a.scratch)
        old, new, state = (os.path.join(work, d) for d in ("old", "new", "state"))
        os.makedirs(old)
        os.makedirs(new)
        try:
            for i in range(n):
                d = os.path.join(new, f"d{i // 1000:04}")
                if i % 1000 == 0:
                    os.makedirs(d)
                os.close(os.open(os.path.join(d, f"file-{i:07}"), os.O_CREAT | os.O_WRONLY, 0o644))
            subprocess.run(
                [fb, "prepare", "--old", old, "--new", new, "--state", state,
                 "--allow-nonempty-new"],
                check=True, capture_output=True)
            rep = measured([fb, "report", "--state", state])
            fnd = measured(["find", new, "-printf", "%p %s\\n"])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append((n, rep, fnd))
    out = [
        "# Peak memory of `ferryfs report` (NEW of N files, 1,000 a directory)",
        "",
        f"`python3 bench/reportmem.py --sizes {a.sizes}`, {time.strftime('%Y-%m-%d')}, "
        f"kernel {os.uname().release}, scratch {a.scratch}",
        "",
        "| entries | report records | report s | report peak RSS MiB | find s | find peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for n, (rs, rm, rl), (fs_, fm, _) in rows:
        out.append(f"| {n} | {rl} | {rs:.2f} | {rm:.1f} | {fs_:.2f} | {fm:.1f} |")
    text = "\n".join(out) + "\n"
    print(text)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "reportmem-latest.md"), "w") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
