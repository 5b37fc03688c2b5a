#!/usr/bin/env python3
"""The copier across machines (issue 26): the coordinator's pace, and copies by 1, 2 and 4
workers against the daemon's own copier, on this machine.

    python3 bench/workersbench.py [--files N] [--scratch DIR] [--data-files N]
                                  [--data-size SIZE] [--reps R] [--bin PATH]

1. `leases`: OLD holds N empty files (`--files`, 20000) in 100 directories, on tmpfs (so that
   no fsync costs anything), and 4 `ferryfs worker` processes copy them (an empty file's copy
   is a create, a chown/chmod, a futimens and an fsync: what is left is the protocol and the
   naming). Timed from `execute` to `execute --wait`'s return: files
   handed out and acknowledged (named) per second by the coordinator, the issue's aim being
   20,000 files/s. The same dataset copied by the daemon's own copier (no workers) is the
   yardstick.
(Each is timed from `execute` to the phase `executed`, polled every 20 ms.)
2. `throughput`: OLD holds `--data-files` files of `--data-size` (2000 of 256 KiB) on
   `--scratch` (a real disk, /var/tmp by default; page cache dropped before each run), copied
   by the daemon's copier alone, then by 1, 2 and 4 workers (each `--threads 8`).
3. `s3` (with `--s3`): OLD and NEW are two buckets of one Garage server on 127.0.0.1 (its
   binary from scripts/setup.sh), OLD filled by rclone with `--s3-files` objects of
   `--s3-size` (1000 of 256 KiB): the daemon's copier (server-side CopyObject) against 1, 2
   and 4 workers (`--threads 32`; multipart uploads the coordinator completes, parts of 5 MiB
   or more copied by the server, smaller objects through the workers).

Each row is the median of `--reps` runs (fresh migration each), with the daemon's CPU seconds
during the copy: with workers, files per daemon CPU second is what one coordinator could name
with a core to itself, the workers' own CPU being elsewhere on real machines. Prints a Markdown table and
writes it to bench/results/workers-latest.md.
"""
import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_bin():
    b = os.environ.get("FERRYFS_BIN")
    if b:
        return b
    target = os.environ.get("CARGO_TARGET_DIR", "/root/.cache/ferryfs/target")
    return os.path.join(target, "release", "ferryfs")


def size_of(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def cpu_secs(pid):
    """User plus system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_pid(state):
    out = subprocess.run(["pgrep", "-f", f"mount --state {state} "], capture_output=True,
                         text=True).stdout.split()
    return int(out[0]) if out else None


def fill(old, files, size):
    data = os.urandom(size) if size else b""
    for i in range(files):
        d = os.path.join(old, f"d{i % 100:03d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(data)


RUNS = [0]


def one_run(binary, base, files, size, workers, threads=8, s3=None):
    """A fresh migration of `files` files of `size` bytes under `base` (or in a bucket of the
    Garage `s3`, into another), copied by `workers` workers (0: the daemon's copier).
    (Seconds from execute to executed, the daemon's CPU seconds meanwhile.)"""
    root = tempfile.mkdtemp(prefix="ferryfs-wbench-", dir=base)
    old, new, state, mnt = (os.path.join(root, d) for d in ("old", "new", "state", "mnt"))
    for d in (old, new, mnt):
        os.makedirs(d)
    fill(old, files, size)
    env = dict(os.environ)
    old_arg, new_arg = old, new
    if s3:
        RUNS[0] += 1
        ob, nb = f"wbench-old-{RUNS[0]}", f"wbench-new-{RUNS[0]}"
        s3.bucket(ob)
        s3.bucket(nb)
        subprocess.run(["rclone", "copy", "--transfers", "32", old, f"g:{ob}"], check=True,
                       env=s3.rclone_env(), capture_output=True)
        old_arg, new_arg = f"s3://{ob}", f"s3://{nb}"
        env = s3.aws_env()
    token = os.path.join(root, "token")
    with open(token, "w") as f:
        f.write(secrets.token_urlsafe(32))
    subprocess.run([binary, "prepare", "--old", old_arg, "--new", new_arg, "--state", state],
                   check=True, capture_output=True, env=env)
    port = free_port()
    mount = [binary, "mount", "--state", state, mnt, "--no-copy"]
    if workers:
        mount += ["--workers-listen", f"127.0.0.1:{port}", "--workers-token-file", token]
    subprocess.run(mount, check=True, capture_output=True, env=env)
    procs = []
    try:
        for i in range(workers):
            procs.append(subprocess.Popen(
                [binary, "worker", "--coordinator", f"http://127.0.0.1:{port}",
                 "--token-file", token, "--threads", str(threads)],
                env=dict(env, JOB_COMPLETION_INDEX=str(i), FERRYFS_LOG="warn"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if workers:
            # Every worker has said hello before the copy starts.
            deadline = time.time() + 30
            while time.time() < deadline:
                st = subprocess.run([binary, "status", "--json", "--state", state],
                                    check=True, capture_output=True, text=True).stdout
                if len(json.loads(st).get("workers", [])) == workers:
                    break
                time.sleep(0.1)
        if size and not s3:
            drop_caches()
        # (`execute --wait` looks once a second: the phase is polled here every 20 ms.)
        pid = daemon_pid(state)
        cpu0 = cpu_secs(pid)
        t0 = time.monotonic()
        subprocess.run([binary, "execute", "--state", state], check=True, capture_output=True)
        while True:
            st = json.loads(subprocess.run([binary, "status", "--json", "--state", state],
                                           check=True, capture_output=True, text=True).stdout)
            if st["phase"] == "executed":
                break
            if time.monotonic() - t0 > 600:
                sys.exit(f"not executed after 600 s: {st}")
            time.sleep(0.02)
        secs = time.monotonic() - t0
        cpu = cpu_secs(pid) - cpu0
        st = subprocess.run([binary, "status", "--json", "--state", state], check=True,
                            capture_output=True, text=True).stdout
        named = sum(w["files"] for w in json.loads(st).get("workers", []))
        if workers and named != files:
            print(f"  (workers named {named} of {files} files; the daemon the rest)",
                  file=sys.stderr)
        for p in procs:
            p.wait(timeout=60)
        return secs, cpu
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        subprocess.run([binary, "unmount", mnt], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--data-files", type=int, default=2000)
    ap.add_argument("--data-size", default="256K")
    ap.add_argument("--scratch", default="/var/tmp")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bin", default=default_bin())
    ap.add_argument("--s3", action="store_true", help="also S3 to S3 through one Garage")
    ap.add_argument("--s3-files", type=int, default=1000)
    ap.add_argument("--s3-size", default="256K")
    a = ap.parse_args()
    if not os.path.exists(a.bin):
        sys.exit(f"no ferryfs binary at {a.bin}: build with `cargo build --release` or set FERRYFS_BIN")
    rows = []
    shm = "/dev/shm"
    for label, workers in (("daemon's copier", 0), ("4 workers", 4)):
        runs = [one_run(a.bin, shm, a.files, 0, workers) for _ in range(a.reps)]
        m = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        rows.append((f"{a.files} empty files, tmpfs", label, m, a.files / m, None, cpu,
                     a.files / cpu))
        print(f"leases: {label}: {m:.2f} s, {a.files / m:,.0f} files/s; daemon CPU {cpu:.2f} s",
              file=sys.stderr)
    size = size_of(a.data_size)
    base = None
    for label, workers in (("daemon's copier", 0), ("1 worker", 1), ("2 workers", 2),
                           ("4 workers", 4)):
        runs = [one_run(a.bin, a.scratch, a.data_files, size, workers) for _ in range(a.reps)]
        m = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        base = base or m
        mib = a.data_files * size / (1 << 20)
        rows.append((f"{a.data_files} x {a.data_size}, {a.scratch}", label, m, mib / m,
                     base / m, cpu, a.data_files / cpu))
        print(f"throughput: {label}: {m:.2f} s, {mib / m:.0f} MiB/s", file=sys.stderr)
    if a.s3:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        from s3bench import Garage
        g = Garage(a.scratch)
        try:
            s3size = size_of(a.s3_size)
            base = None
            for label, workers in (("daemon's copier", 0), ("1 worker", 1), ("2 workers", 2),
                                   ("4 workers", 4)):
                runs = [one_run(a.bin, a.scratch, a.s3_files, s3size, workers, threads=32, s3=g)
                        for _ in range(a.reps)]
                m = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] for r in runs)
                base = base or m
                mib = a.s3_files * s3size / (1 << 20)
                rows.append((f"S3 to S3, {a.s3_files} x {a.s3_size}, one Garage", label, m,
                             mib / m, base / m, cpu, a.s3_files / cpu))
                print(f"s3: {label}: {m:.2f} s, {mib / m:.0f} MiB/s", file=sys.stderr)
        finally:
            g.stop()
    out = ["| dataset | copied by | seconds | rate | vs the daemon's copier | daemon CPU s | "
           "files per daemon CPU s |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for ds, label, secs, rate, ratio, cpu, per_cpu in rows:
        unit = "files/s" if ratio is None else "MiB/s"
        r = "" if ratio is None else f"{ratio:.2f}x"
        out.append(f"| {ds} | {label} | {secs:.2f} | {rate:,.0f} {unit} | {r} | {cpu:.2f} | "
                   f"{per_cpu:,.0f} |")
    text = "\n".join(out) + "\n"
    print(text)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "results", "workers-latest.md"), "w") as f:
        s3 = " --s3" if a.s3 else ""
        f.write(f"`python3 bench/workersbench.py --reps {a.reps}{s3}` "
                f"({time.strftime('%Y-%m-%d')})\n\n")
        f.write(text)


if __name__ == "__main__":
    main()
