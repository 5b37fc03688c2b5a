#!/usr/bin/env python3
"""An S3 NEW's publisher under steady writes: what the daemon costs once the bucket holds a
large tree and an application keeps rewriting one file.

    python3 bench/publishbench.py [FILES]       # default 50,000 one-byte files

A throw-away single-node Garage (bench/s3bench.py's) on 127.0.0.1; OLD is FILES one-byte files
in directories of 1,000 under SCRATCH (/var/tmp); NEW is s3://pub. Prints how long
`execute --wait` took to copy and publish everything, then rewrites one file through the
mounted view every 100 ms for 30 s and prints the daemon's CPU (from /proc) and RSS, and the
length of the publish passes (and of their walks) from the daemon's log.
"""
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from s3bench import Garage  # noqa: E402


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50000
    b = os.environ.get("FERRYFS_BIN") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "ferryfs"
    )
    if not os.access(b, os.X_OK):
        sys.exit(f"publishbench: no ferryfs binary at {b} (cargo build --release, or FERRYFS_BIN)")
    s = os.path.join(os.environ.get("SCRATCH", "/var/tmp"), "ferryfs-publishbench")
    shutil.rmtree(s, ignore_errors=True)
    os.makedirs(s + "/old")
    os.makedirs(s + "/mnt")
    for d in range((n + 999) // 1000):
        p = f"{s}/old/d{d:03}"
        os.makedirs(p)
        for i in range(min(1000, n - d * 1000)):
            with open(f"{p}/f{i:04}", "w") as f:
                f.write("x")
    g = Garage(os.environ.get("SCRATCH", "/var/tmp"))
    mounted = False
    try:
        g.bucket("pub")
        env = g.aws_env()
        st = s + "/st"
        subprocess.run([b, "prepare", "--old", s + "/old", "--new", "s3://pub", "--state", st],
                       env=env, check=True, capture_output=True)
        subprocess.run([b, "mount", "--state", st, s + "/mnt"], env=env, check=True)
        mounted = True
        t = time.time()
        r = subprocess.run([b, "execute", "--state", st, "--wait"], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"publishbench: execute --wait failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        print(f"execute --wait: {n} files copied and published in {time.time() - t:.1f} s",
              flush=True)
        pid = int(subprocess.run(["pgrep", "-f", f"mount --state {st}"], capture_output=True,
                                 text=True).stdout.split()[0])

        def cpu():
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

        def rss_mib():
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024

        time.sleep(3)
        log_from = os.path.getsize(st + "/ferryfs.log")
        c0, t0 = cpu(), time.time()
        while time.time() - t0 < 30:
            with open(s + "/mnt/d000/f0000", "w") as f:
                f.write(str(time.time()))
            time.sleep(0.1)
        c1, t1 = cpu(), time.time()
        with open(st + "/ferryfs.log") as f:
            f.seek(log_from)
            log = f.read()
        passes = re.findall(r"publish pass .*? ms=(\d+) walk_ms=(\d+)", log)
        print(f"one file rewritten every 100 ms for {t1 - t0:.0f} s: daemon CPU "
              f"{100 * (c1 - c0) / (t1 - t0):.0f}% of a core, RSS {rss_mib():.0f} MiB, "
              f"{len(passes)} publish passes", flush=True)
        if passes:
            ms = sorted(int(p[0]) for p in passes)
            walk = sorted(int(p[1]) for p in passes)
            print(f"pass length {ms[0]}-{ms[-1]} ms (median {ms[len(ms) // 2]}), "
                  f"walk {walk[0]}-{walk[-1]} ms (median {walk[len(walk) // 2]})")
    finally:
        if mounted:
            subprocess.run(["umount", s + "/mnt"])
            time.sleep(1)
        g.stop()
        shutil.rmtree(s, ignore_errors=True)


if __name__ == "__main__":
    main()
