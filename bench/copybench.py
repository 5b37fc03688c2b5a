#!/usr/bin/env python3
"""Copy OLD to NEW with ferryfs and its peers, on the same file system, in one run.

    python3 bench/copybench.py [--quick] [--million] [--reps N]

Datasets (made once per run, in SCRATCH/old-*):
  small   50,000 files of 1 to 64 KiB in a nested tree (50 x 10 dirs of 100 files)
  large   8 files of 256 MiB
  million (with --million) 1,000,000 empty files in 1,000 dirs: only ferryfs runs, for its
          peak RSS (the target: under 256 MiB whatever the file count)

Tools, each into a fresh empty NEW, page cache dropped before every run, runs interleaved:
  cp -a, rsync -a, rclone copy --transfers 8 (--links, --local-no-check-updated), the durable
  equivalents `cp -a; sync -f NEW` and `rsync -a; sync -f NEW` (the copy on disk when the
  command ends, as ferryfs's is: cp and rsync alone end with the data in the page cache),
  `cp -a x16; sync` (16 cp processes at once, then `sync -f NEW`: what parallelism alone buys),
  ferryfs (prepare, then `execute` in the foreground: the offline copier, default 16 workers).
For each: wall time, files/s, MiB/s and the process's peak RSS (wait4's ru_maxrss); the
median of --reps runs (default 3; 1 with --quick, which also shrinks the datasets).
Prints a Markdown table and writes it to bench/results/copy-latest.md.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh(*cmd, **kw):
    subprocess.run(cmd, check=True, **kw)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def make_small(root, dirs_a, dirs_b, per):
    n = 0
    total = 0
    seed = 12345
    for a in range(dirs_a):
        for b in range(dirs_b):
            d = os.path.join(root, f"a{a:02}", f"b{b:02}")
            os.makedirs(d)
            for i in range(per):
                seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
                size = 1024 + seed % (63 * 1024)
                with open(os.path.join(d, f"f{i:03}"), "wb") as f:
                    f.write(os.urandom(64) * (size // 64) + b"x" * (size % 64))
                n += 1
                total += size
    return n, total


def make_large(root, count, mib):
    os.makedirs(root)
    block = os.urandom(1 << 20)
    for i in range(count):
        with open(os.path.join(root, f"big{i}"), "wb") as f:
            for _ in range(mib):
                f.write(block)
    return count, count * mib << 20


def make_million(root, dirs, per):
    for d in range(dirs):
        p = os.path.join(root, f"d{d:04}")
        os.makedirs(p)
        for i in range(per):
            os.close(os.open(os.path.join(p, f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
    return dirs * per, 0


def run_measured(cmd, env=None):
    """Run cmd; return (seconds, peak RSS in MiB of the process tree's largest member)."""
    # stderr into a file, not a pipe read at the end: a tool that logs more than a pipe holds
    # (ferryfs's retry warnings on a full NEW) would block on it and never end.
    with tempfile.TemporaryFile() as errf:
        t = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        dt = time.monotonic() - t
        errf.seek(0)
        err = errf.read().decode(errors="replace")[-20000:]
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"copybench: {' '.join(cmd)} failed:\n{err}")
    return dt, ru.ru_maxrss / 1024


def tools(ferryfs):
    def cp(old, new, st):
        return ["cp", "-a", old + "/.", new]

    def rsync(old, new, st):
        return ["rsync", "-a", old + "/", new + "/"]

    def cp_sync(old, new, st):
        # The durable equivalent: the copy is on disk when the command ends (as ferryfs's is).
        return ["sh", "-c", f"cp -a '{old}/.' '{new}' && sync -f '{new}'"]

    def rsync_sync(old, new, st):
        return ["sh", "-c", f"rsync -a '{old}/' '{new}/' && sync -f '{new}'"]

    def cp_par_sync(old, new, st):
        # A tuned durable peer: 16 cp processes at once (as many as ferryfs's workers), the
        # directories made first, one `sync -f` at the end. No journal and no crash safety, and
        # directory times are not kept: a yardstick for what parallelism alone buys here.
        files = sum(len(f) for _, _, f in os.walk(old))
        per = max(1, min(200, files // 64))
        return ["sh", "-c",
                f"cd '{old}' && find . -type d -print0 | (cd '{new}' && xargs -0 mkdir -p) && "
                f"find . ! -type d -print0 | xargs -0 -P16 -n {per} cp -a --parents -t '{new}' "
                f"&& sync -f '{new}'"]

    def rclone(old, new, st):
        return ["rclone", "copy", "--transfers", "8", "--links",
                "--local-no-check-updated", old, new]

    def ferry(old, new, st):
        # prepare is not timed (it scans OLD once for totals); execute is the copy.
        sh(ferryfs, "prepare", "--old", old, "--new", new, "--state", st,
           stdout=subprocess.DEVNULL)
        return [ferryfs, "execute", "--state", st]

    return {
        "cp -a": cp,
        "rsync -a": rsync,
        "rclone --transfers 8": rclone,
        "cp -a; sync": cp_sync,
        "rsync -a; sync": rsync_sync,
        "cp -a x16; sync": cp_par_sync,
        "ferryfs": ferry,
    }


def fs_desc(path):
    """'ext4 /dev/loop0 (journal)' for the file system holding path, from findmnt."""
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE,TARGET", "-T", path],
                             check=True, capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    desc = " ".join(out[:3])
    if out and out[0].startswith("ext"):
        try:
            feats = subprocess.run(["debugfs", "-R", "features", out[1]], check=True,
                                   capture_output=True, text=True).stdout
            desc += ", journal" if "has_journal" in feats else ", no journal"
        except (OSError, subprocess.CalledProcessError):
            pass
    return desc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--million", action="store_true")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--only", help="comma-separated tool names")
    ap.add_argument("--scratch", default="/var/tmp",
                    help="the file system to copy on (OLD and NEW both): a directory there")
    ap.add_argument("--datasets", default="small,large",
                    help="comma-separated: small, large (and million with --million)")
    a = ap.parse_args()
    reps = a.reps or (1 if a.quick else 3)
    target = os.environ.get("CARGO_TARGET_DIR", "/root/.cache/ferryfs/target")
    ferryfs = os.environ.get("FERRYFS_BIN", os.path.join(target, "release", "ferryfs"))
    if not os.path.exists(ferryfs):
        sh("cargo", "build", "--release", cwd=ROOT)
    for t in ["rsync", "rclone"]:
        if not shutil.which(t):
            sh("apt-get", "install", "-y", t, stdout=subprocess.DEVNULL)
    scratch = os.path.join(a.scratch, f"ferryfs-copybench-{os.getpid()}")
    os.makedirs(scratch)
    results = {}
    try:
        datasets = []
        print("[copybench] making datasets ...", flush=True)
        want = a.datasets.split(",")
        if "small" in want:
            dims = (10, 10, 100) if a.quick else (50, 10, 100)
            datasets.append(("small", make_small(f"{scratch}/old-small", *dims)))
        if "large" in want:
            dims = (2, 64) if a.quick else (8, 256)
            datasets.append(("large", make_large(f"{scratch}/old-large", *dims)))
        if a.million:
            datasets.append(("million", make_million(f"{scratch}/old-million", 1000, 1000)))
        ts = tools(ferryfs)
        if a.only:
            ts = {k: v for k, v in ts.items() if k in a.only.split(",")}
        keep_copies = fs_desc(scratch).endswith("no journal")
        for name, (files, size) in datasets:
            old = f"{scratch}/old-{name}"
            names = ["ferryfs"] if name == "million" else list(ts)
            for rep in range(reps):
                for tool in names:
                    # Every run gets a fresh NEW. On an ext4 without a journal (this machine's
                    # root) nothing is deleted until the dataset is done: inodes deleted in the
                    # last 30 s are skipped by the allocator there at a large cost, which would
                    # tax whichever tool runs after a deletion. Elsewhere each copy goes as soon
                    # as it is measured, so the scratch needs room for OLD and one copy only.
                    slug = "".join(ch for ch in tool if ch.isalnum())
                    new = f"{scratch}/new-{name}-{slug}-{rep}"
                    st = f"{scratch}/state-{name}-{rep}"
                    os.makedirs(new)
                    cmd = ts[tool](old, new, st)
                    drop_caches()
                    dt, rss = run_measured(cmd)
                    print(f"[copybench] {name:7} {tool:22} rep {rep}: {dt:8.2f} s  "
                          f"{files / dt:9.0f} files/s  {size / dt / 2**20:8.1f} MiB/s  "
                          f"rss {rss:6.1f} MiB", flush=True)
                    results.setdefault((name, tool), []).append((dt, rss))
                    if not keep_copies:
                        shutil.rmtree(new, ignore_errors=True)
                        shutil.rmtree(st, ignore_errors=True)
            for d in os.listdir(scratch):
                if d.startswith(("new-", "state-")):
                    shutil.rmtree(f"{scratch}/{d}", ignore_errors=True)
            if keep_copies:
                time.sleep(31)  # let the deletions age out of ext4's recently-deleted window
        lines = [
            f"Copy benchmark, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, kernel "
            f"{os.uname().release}, {os.cpu_count()} CPUs; OLD and NEW on the same file system "
            f"({fs_desc(scratch)}); page "
            f"cache dropped before each run; median of {reps}.",
            "",
            f"Command: `python3 bench/copybench.py{''.join(' ' + x for x in sys.argv[1:])}`",
            "",
            "| dataset | tool | seconds | files/s | MiB/s | peak RSS MiB | vs rsync (files/s) | vs cp -a (MiB/s) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, (files, size) in datasets:
            med = {}
            for tool in (["ferryfs"] if name == "million" else list(ts)):
                runs = results[(name, tool)]
                dt = statistics.median(r[0] for r in runs)
                rss = max(r[1] for r in runs)
                med[tool] = (dt, rss)
            for tool, (dt, rss) in med.items():
                vs_rsync = (med["rsync -a"][0] / dt) if "rsync -a" in med else None
                vs_cp = (med["cp -a"][0] / dt) if "cp -a" in med else None
                lines.append(
                    f"| {name} ({files} files, {size / 2**20:.0f} MiB) | {tool} | {dt:.2f} | "
                    f"{files / dt:.0f} | {size / dt / 2**20:.1f} | {rss:.1f} | "
                    f"{'' if vs_rsync is None else f'{vs_rsync:.2f}x'} | "
                    f"{'' if vs_cp is None else f'{vs_cp:.2f}x'} |")
        table = "\n".join(lines)
        print("\n" + table)
        os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
        with open(os.path.join(ROOT, "bench", "results", "copy-latest.md"), "w") as f:
            f.write(table + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
