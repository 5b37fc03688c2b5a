#!/usr/bin/env python3
"""Migrate an S3 bucket into a POSIX directory: ferryfs against rclone, in one run.

    python3 bench/s3bench.py [--quick] [--reps N] [--datasets small,large]

A throw-away single-node Garage (the one scripts/setup.sh installs, tests/s3/garage.toml) is
started on 127.0.0.1 with its data under SCRATCH (/var/tmp by default: a real disk), and filled
by `rclone copy` from local trees (so objects carry rclone's mtime metadata, as real buckets
written by rclone do):
  small   10,000 objects of 1 to 64 KiB in 10 x 10 prefixes (--quick: 2,000)
  large   4 objects of 256 MiB (--quick: 2 of 64 MiB)

Each run copies one dataset into a fresh empty NEW, the page cache dropped before it, tools
interleaved, --reps runs each (default 3):
  rclone copy --transfers 8         (the rclone of scripts/setup.sh)
  rclone copy --transfers 16
  rclone copy --transfers 64        (as many streams as ferryfs's default workers for S3)
  ferryfs: `prepare --old s3://...` (lists the bucket for the totals) then `execute` (the
           offline copier, default 64 workers for an S3 OLD); its figures count both commands.
ferryfs's copy is durable when it ends (one syncfs of NEW per batch, before the names) and
recorded in its journal; rclone's ends in the page cache.
Prints a Markdown table (median seconds, files/s, MiB/s, peak RSS, ratio to rclone
--transfers 8) and writes it to bench/results/s3-latest.md.
"""
import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from copybench import drop_caches, make_large, make_small, run_measured  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Garage:
    def __init__(self, scratch):
        self.bin = os.environ.get("GARAGE_BIN") or shutil.which("garage") or os.path.join(
            os.environ.get("FERRYFS_TOOLS_BIN", "/root/.cache/ferryfs/tools/bin"), "garage"
        )
        if not os.access(self.bin, os.X_OK):
            sys.exit(f"s3bench: no garage binary at {self.bin}: run scripts/setup.sh first")
        self.dir = tempfile.mkdtemp(prefix="ferryfs-s3bench-garage-", dir=scratch)
        s3, rpc, admin = free_port(), free_port(), free_port()
        with open(os.path.join(ROOT, "tests/s3/garage.toml")) as f:
            conf = (
                f.read()
                .replace("@DIR@", self.dir)
                .replace("@S3@", str(s3))
                .replace("@RPC@", str(rpc))
                .replace("@ADMIN@", str(admin))
            )
        self.config = os.path.join(self.dir, "garage.toml")
        with open(self.config, "w") as f:
            f.write(conf)
        log = open(os.path.join(self.dir, "server.log"), "w")
        self.proc = subprocess.Popen(
            [self.bin, "-c", self.config, "server"],
            stdout=log,
            stderr=log,
            env=dict(os.environ, RUST_LOG="warn"),
        )
        self.endpoint = f"http://127.0.0.1:{s3}"
        t = time.time()
        while True:
            ok = subprocess.run(self.cli("status"), capture_output=True).returncode == 0
            if ok:
                try:
                    socket.create_connection(("127.0.0.1", s3), 1).close()
                    break
                except OSError:
                    pass
            if time.time() - t > 20:
                sys.exit("s3bench: garage did not answer within 20 s")
            time.sleep(0.05)
        node = self.out("node", "id", "-q").strip().split("@")[0]
        self.out("layout", "assign", "-z", "dc1", "-c", "10G", node)
        self.out("layout", "apply", "--version", "1")
        key = self.out("key", "create", "bench-key")
        self.key_id = re.search(r"Key ID:\s*(\S+)", key).group(1)
        self.secret = re.search(r"Secret key:\s*(\S+)", key).group(1)
        self.out("key", "allow", "--create-bucket", "bench-key")

    def cli(self, *args):
        return [self.bin, "-c", self.config, *args]

    def out(self, *args):
        r = subprocess.run(self.cli(*args), capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"s3bench: garage {' '.join(args)}: {r.stderr}")
        return r.stdout

    def bucket(self, name):
        self.out("bucket", "create", name)
        self.out("bucket", "allow", "--read", "--write", "--owner", name, "--key", "bench-key")

    def aws_env(self):
        env = dict(os.environ)
        env.update(
            AWS_ENDPOINT_URL=self.endpoint,
            AWS_ACCESS_KEY_ID=self.key_id,
            AWS_SECRET_ACCESS_KEY=self.secret,
            AWS_REGION="garage",
        )
        return env

    def rclone_env(self):
        env = dict(os.environ)
        env.pop("AWS_CA_BUNDLE", None)  # Debian's rclone 1.60 refuses to start with it set
        env.update(
            RCLONE_CONFIG_G_TYPE="s3",
            RCLONE_CONFIG_G_PROVIDER="Other",
            RCLONE_CONFIG_G_ENDPOINT=self.endpoint,
            RCLONE_CONFIG_G_ACCESS_KEY_ID=self.key_id,
            RCLONE_CONFIG_G_SECRET_ACCESS_KEY=self.secret,
            RCLONE_CONFIG_G_REGION="garage",
            RCLONE_CONFIG_G_FORCE_PATH_STYLE="true",
        )
        return env

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def tools_or_exit(name):
    """The ferryfs release binary to bench (FERRYFS_BIN, else the target dir's), with rclone
    present; exits naming `name` and what is missing otherwise."""
    ferryfs = os.environ.get("FERRYFS_BIN") or os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "/root/.cache/ferryfs/target"), "release/ferryfs"
    )
    if not os.access(ferryfs, os.X_OK):
        sys.exit(f"{name}: no ferryfs binary at {ferryfs} (cargo build --release, or FERRYFS_BIN)")
    if not shutil.which("rclone"):
        sys.exit(f"{name}: rclone is missing: run scripts/setup.sh")
    return ferryfs


def check_copy(src, dst):
    r = subprocess.run(["diff", "-r", "-q", src, dst], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"s3bench: the copy in {dst} differs from {src}:\n{r.stdout[:2000]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--datasets", default="small,large")
    ap.add_argument("--scratch", default="/var/tmp")
    a = ap.parse_args()
    reps = a.reps or (1 if a.quick else 3)
    ferryfs = tools_or_exit("s3bench")
    work = tempfile.mkdtemp(prefix="ferryfs-s3bench-", dir=a.scratch)
    g = Garage(work)
    try:
        g.bucket("bench")
        sets = {}
        for name in a.datasets.split(","):
            src = os.path.join(work, "src-" + name)
            if name == "small":
                # 10 x 10 prefixes of 100 objects (--quick: 4 x 5)
                n, b = make_small(src, 4 if a.quick else 10, 5 if a.quick else 10, 100)
            elif name == "large":
                n, b = make_large(src, 2 if a.quick else 4, 64 if a.quick else 256)
            else:
                sys.exit(f"s3bench: unknown dataset {name}")
            r = subprocess.run(
                ["rclone", "copy", "--transfers", "16", src, f"g:bench/{name}"],
                env=g.rclone_env(),
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                sys.exit(f"s3bench: uploading {name}: {r.stderr}")
            sets[name] = (src, n, b)
            print(f"dataset {name}: {n} objects, {b / 2**20:.0f} MiB", flush=True)
        tools = [
            ("rclone copy --transfers 8", "rclone8"),
            ("rclone copy --transfers 16", "rclone16"),
            ("rclone copy --transfers 64", "rclone64"),
            ("ferryfs (prepare + execute)", "ferryfs"),
        ]
        results = {}
        run_id = 0
        for rep in range(reps):
            for name, (src, n, b) in sets.items():
                for label, key in tools:
                    run_id += 1
                    dst = os.path.join(work, f"new-{run_id}")
                    os.makedirs(dst)
                    drop_caches()
                    if key.startswith("rclone"):
                        t, rss = run_measured(
                            ["rclone", "copy", "--transfers", key[6:], f"g:bench/{name}", dst],
                            g.rclone_env(),
                        )
                    else:
                        state = os.path.join(work, f"state-{run_id}")
                        env = g.aws_env()
                        t1, r1 = run_measured(
                            [ferryfs, "prepare", "--old", f"s3://bench/{name}", "--new", dst,
                             "--state", state],
                            env,
                        )
                        t2, r2 = run_measured([ferryfs, "execute", "--state", state], env)
                        t, rss = t1 + t2, max(r1, r2)
                        shutil.rmtree(state)
                    check_copy(src, dst)
                    shutil.rmtree(dst)
                    results.setdefault((name, label), []).append((t, rss))
                    print(f"  {name} {label}: {t:.2f} s, {rss:.0f} MiB", flush=True)
        lines = [
            "| dataset | tool | seconds | objects/s | MiB/s | peak RSS MiB | vs rclone --transfers 8 |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, (src, n, b) in sets.items():
            base = statistics.median(t for t, _ in results[(name, tools[0][0])])
            for label, _ in tools:
                ts = [t for t, _ in results[(name, label)]]
                med = statistics.median(ts)
                rss = max(r for _, r in results[(name, label)])
                lines.append(
                    f"| {name} ({n} objects, {b / 2**20:.0f} MiB) | {label} | {med:.2f} | "
                    f"{n / med:.0f} | {b / 2**20 / med:.1f} | {rss:.1f} | {base / med:.2f}x |"
                )
        table = "\n".join(lines)
        print()
        print(table)
        os.makedirs(os.path.join(ROOT, "bench/results"), exist_ok=True)
        with open(os.path.join(ROOT, "bench/results/s3-latest.md"), "w") as f:
            f.write(f"<!-- python3 bench/s3bench.py {' '.join(sys.argv[1:])}, {time.ctime()} -->\n")
            f.write(table + "\n")
    finally:
        g.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
