#!/usr/bin/env python3
"""Migrate into an S3 NEW: ferryfs against `rclone copy`, in one run, same number of transfers.

    python3 bench/s3newbench.py [--quick] [--reps N] [--transfers N] [--pairings posix,s3]

Two throw-away single-node Garage servers (separate processes, ports, data dirs and keys) are
started on 127.0.0.1 with their data under SCRATCH (/var/tmp by default: a real disk):
OLD's service and NEW's service. Datasets, made locally and uploaded into OLD's service by
`rclone copy`:
  small   10,000 objects of 1 to 64 KiB in 10 x 10 prefixes (--quick: 2,000)
  large   4 objects of 256 MiB (--quick: 2 of 64 MiB)
Pairings:
  posix   OLD a local directory, NEW a bucket on NEW's service
  s3      OLD the bucket on OLD's service, NEW a bucket on NEW's service (each reached with a
          profile of its own: another endpoint, other keys)
Each run copies one dataset into a fresh prefix of NEW's bucket, the page cache dropped
before it, tools interleaved, --reps runs each (default 3):
  rclone copy --transfers N
  ferryfs: `prepare` then `execute --workers N` (the offline copier, which sends OLD's bytes
           straight into the bucket, then confirms the bucket holds it all); its figures count
           both commands.
Every copy is checked with `rclone check` against the source. The peak bytes under
ferryfs's state dir (sampled every 100 ms: its journal and staging tree) are in the table.
Prints a Markdown table (median seconds, objects/s, MiB/s, peak RSS, peak state dir, ratio to
rclone) and writes it to bench/results/s3new-latest.md.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from copybench import drop_caches, make_large, make_small, run_measured  # noqa: E402
from s3bench import Garage, tools_or_exit  # noqa: E402


def tree_bytes(path):
    """Bytes the files below `path` take on disk (their blocks)."""
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_blocks * 512
            except OSError:
                pass
    return total


class PeakSampler:
    """The peak of tree_bytes(path) while running."""

    def __init__(self, path):
        self.path, self.peak, self.done = path, 0, False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.done:
            if os.path.isdir(self.path):
                self.peak = max(self.peak, tree_bytes(self.path))
            time.sleep(0.1)

    def stop(self):
        self.done = True
        self.t.join()
        return self.peak


def rclone_env(old, new):
    env = dict(os.environ)
    env.pop("AWS_CA_BUNDLE", None)  # Debian's rclone 1.60 refuses to start with it set
    for name, g in (("G1", old), ("G2", new)):
        env.update({
            f"RCLONE_CONFIG_{name}_TYPE": "s3",
            f"RCLONE_CONFIG_{name}_PROVIDER": "Other",
            f"RCLONE_CONFIG_{name}_ENDPOINT": g.endpoint,
            f"RCLONE_CONFIG_{name}_ACCESS_KEY_ID": g.key_id,
            f"RCLONE_CONFIG_{name}_SECRET_ACCESS_KEY": g.secret,
            f"RCLONE_CONFIG_{name}_REGION": "garage",
            f"RCLONE_CONFIG_{name}_FORCE_PATH_STYLE": "true",
        })
    return env


def ferryfs_env(work, old, new):
    """AWS profiles `old` and `new` (each service's endpoint and keys), nothing else."""
    aws = os.path.join(work, "aws")
    os.makedirs(aws, exist_ok=True)
    with open(os.path.join(aws, "credentials"), "w") as f:
        for name, g in (("old", old), ("new", new)):
            f.write(f"[{name}]\naws_access_key_id = {g.key_id}\n"
                    f"aws_secret_access_key = {g.secret}\n")
    with open(os.path.join(aws, "config"), "w") as f:
        for name, g in (("old", old), ("new", new)):
            f.write(f"[profile {name}]\nregion = garage\nendpoint_url = {g.endpoint}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=os.path.join(aws, "credentials"),
        AWS_CONFIG_FILE=os.path.join(aws, "config"),
    )
    return env


def check(src, dst, env):
    r = subprocess.run(["rclone", "check", "--one-way", src, dst], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"s3newbench: {dst} differs from {src}:\n{r.stderr[-3000:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--transfers", type=int, default=16)
    ap.add_argument("--datasets", default="small,large")
    ap.add_argument("--pairings", default="posix,s3")
    ap.add_argument("--scratch", default="/var/tmp")
    a = ap.parse_args()
    reps = a.reps or (1 if a.quick else 3)
    n_tr = str(a.transfers)
    ferryfs = tools_or_exit("s3newbench")
    work = tempfile.mkdtemp(prefix="ferryfs-s3newbench-", dir=a.scratch)
    old = Garage(work)
    new = Garage(work)
    try:
        old.bucket("old")
        new.bucket("new")
        renv = rclone_env(old, new)
        fenv = ferryfs_env(work, old, new)
        sets = {}
        for name in a.datasets.split(","):
            src = os.path.join(work, "src-" + name)
            if name == "small":
                n, b = make_small(src, 4 if a.quick else 10, 5 if a.quick else 10, 100)
            elif name == "large":
                n, b = make_large(src, 2 if a.quick else 4, 64 if a.quick else 256)
            else:
                sys.exit(f"s3newbench: unknown dataset {name}")
            r = subprocess.run(["rclone", "copy", "--transfers", "16", src, f"g1:old/{name}"],
                               env=renv, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"s3newbench: uploading {name}: {r.stderr}")
            sets[name] = (src, n, b)
            print(f"dataset {name}: {n} objects, {b / 2**20:.0f} MiB", flush=True)
        pairings = a.pairings.split(",")
        tools = [(f"rclone copy --transfers {n_tr}", "rclone"),
                 (f"ferryfs (prepare + execute --workers {n_tr})", "ferryfs")]
        results = {}
        run_id = 0
        for rep in range(reps):
            for pairing in pairings:
                for name, (src, n, b) in sets.items():
                    for label, key in tools:
                        run_id += 1
                        prefix = f"run-{run_id}"
                        drop_caches()
                        if pairing == "posix":
                            r_src, f_old, f_flags = src, src, []
                        else:
                            r_src = f"g1:old/{name}"
                            f_old = f"s3://old/{name}"
                            f_flags = ["--old-s3-profile", "old"]
                        peak = 0
                        if key == "rclone":
                            t, rss = run_measured(
                                ["rclone", "copy", "--transfers", n_tr, r_src, f"g2:new/{prefix}"],
                                renv)
                        else:
                            state = os.path.join(work, f"state-{run_id}")
                            sampler = PeakSampler(state)
                            t1, r1 = run_measured(
                                [ferryfs, "prepare", "--old", f_old, "--new",
                                 f"s3://new/{prefix}", "--new-s3-profile", "new",
                                 *f_flags, "--state", state], fenv)
                            t2, r2 = run_measured(
                                [ferryfs, "execute", "--workers", n_tr, "--state", state], fenv)
                            peak = sampler.stop()
                            t, rss = t1 + t2, max(r1, r2)
                            print(f"    (prepare {t1:.2f} s, execute {t2:.2f} s)", flush=True)
                            shutil.rmtree(state)
                        check(r_src, f"g2:new/{prefix}", renv)
                        subprocess.run(["rclone", "purge", f"g2:new/{prefix}"], env=renv,
                                       capture_output=True)
                        results.setdefault((pairing, name, key), []).append((t, rss, peak))
                        print(f"  {pairing} {name} {label}: {t:.2f} s, RSS {rss:.0f} MiB, "
                              f"state dir peak {peak / 2**20:.1f} MiB", flush=True)
        lines = [
            "| pairing | dataset | tool | seconds | objects/s | MiB/s | peak RSS MiB | "
            "peak state dir MiB | vs rclone |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        what = {"posix": "POSIX to S3", "s3": "S3 to S3 (two services)"}
        for pairing in pairings:
            for name, (src, n, b) in sets.items():
                base = statistics.median(t for t, _, _ in results[(pairing, name, "rclone")])
                for label, key in tools:
                    rs = results[(pairing, name, key)]
                    med = statistics.median(t for t, _, _ in rs)
                    rss = max(r for _, r, _ in rs)
                    peak = max(p for _, _, p in rs)
                    peak_s = f"{peak / 2**20:.1f}" if key == "ferryfs" else "-"
                    lines.append(
                        f"| {what[pairing]} | {name} ({n} objects, {b / 2**20:.0f} MiB) | "
                        f"{label} | {med:.2f} | {n / med:.0f} | {b / 2**20 / med:.1f} | "
                        f"{rss:.1f} | {peak_s} | {base / med:.2f}x |")
        table = "\n".join(lines)
        print()
        print(table)
        os.makedirs(os.path.join(ROOT, "bench/results"), exist_ok=True)
        with open(os.path.join(ROOT, "bench/results/s3new-latest.md"), "w") as f:
            f.write(f"<!-- python3 bench/s3newbench.py {' '.join(sys.argv[1:])}, {time.ctime()} -->\n")
            f.write(table + "\n")
    finally:
        old.stop()
        new.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
