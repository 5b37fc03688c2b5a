#!/usr/bin/env python3
"""Small-file metadata benchmark for ferryfs (standard library only).

Usage:
  smallfiles.py create DIR N   create DIR (must not exist) holding N files of 4 KiB,
                               1000 per subdirectory (DIR/d0000/f0000000, ...)
  smallfiles.py stat DIR       os.lstat() every entry under DIR, recursively
  smallfiles.py mktar TAR N    write TAR holding N files of 1-8 KiB, 1000 per directory
  smallfiles.py untar TAR DIR  `tar -xf TAR -C DIR` (DIR must not exist; created)
  smallfiles.py rmtree DIR     `rm -rf DIR`
  smallfiles.py lslr DIR       `ls -lR DIR` (output counted, not kept): the entries listed
  smallfiles.py firstbyte DIR  open each file in DIR and read its first byte; the median
                               and p90 of the per-file time (open + 1-byte read + close)

Each prints one line of key=value pairs on stdout, e.g.
  create files=10000 dirs=10 seconds=0.412345
  stat entries=10010 seconds=0.051234
The time covers the operations only (not interpreter start-up). Errors go to stderr with a
non-zero exit status.
"""

import os
import stat
import sys
import time

FILE_SIZE = 4096
PER_DIR = 1000


def create(root, n):
    if n < 0:
        raise ValueError("N must be >= 0")
    payload = os.urandom(FILE_SIZE)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    dirs = 0
    t0 = time.perf_counter()
    os.mkdir(root)
    subdir = None
    for i in range(n):
        if i % PER_DIR == 0:
            subdir = os.path.join(root, "d%04d" % (i // PER_DIR))
            os.mkdir(subdir)
            dirs += 1
        fd = os.open(os.path.join(subdir, "f%07d" % i), flags, 0o644)
        try:
            if os.write(fd, payload) != FILE_SIZE:
                raise OSError("short write in %s" % subdir)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - t0
    print("create files=%d dirs=%d seconds=%.6f" % (n, dirs, elapsed))


def stat_tree(root):
    entries = 0
    t0 = time.perf_counter()
    if not stat.S_ISDIR(os.lstat(root).st_mode):
        raise NotADirectoryError(root)
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            names = [e.name for e in it]
        for name in names:
            p = os.path.join(d, name)
            st = os.lstat(p)
            entries += 1
            if stat.S_ISDIR(st.st_mode):
                stack.append(p)
    elapsed = time.perf_counter() - t0
    print("stat entries=%d seconds=%.6f" % (entries, elapsed))


def mktar(tar, n):
    import random
    import tarfile
    import io

    rnd = random.Random(5)
    payload = os.urandom(8192)
    with tarfile.open(tar, "w") as t:
        for i in range(n):
            info = tarfile.TarInfo("src/d%04d/f%07d" % (i // PER_DIR, i))
            info.size = rnd.randint(1024, 8192)
            info.mode = 0o644
            info.mtime = 1_600_000_000
            t.addfile(info, io.BytesIO(payload[: info.size]))
    print("mktar files=%d" % n)


def timed(what, argv):
    import subprocess

    t0 = time.perf_counter()
    subprocess.run(argv, check=True)
    print("%s seconds=%.6f" % (what, time.perf_counter() - t0))


def lslr(d):
    import subprocess

    t0 = time.perf_counter()
    out = subprocess.run(["ls", "-lR", "--", d], check=True, stdout=subprocess.PIPE).stdout
    elapsed = time.perf_counter() - t0
    # One line per entry, "total N" per directory, "DIR:" and a blank line between them.
    entries = sum(1 for l in out.splitlines() if l[:1] in (b"-", b"d", b"l", b"c", b"b", b"p", b"s"))
    print("lslr entries=%d seconds=%.6f" % (entries, elapsed))


def firstbyte(d):
    names = sorted(os.listdir(d))
    times = []
    for name in names:
        p = os.path.join(d, name)
        t0 = time.perf_counter()
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            if len(os.read(fd, 1)) != 1:
                raise OSError("empty read of %s" % p)
        finally:
            os.close(fd)
        times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    p90 = times[min(len(times) - 1, int(len(times) * 0.9))]
    print("firstbyte files=%d median_ms=%.4f p90_ms=%.4f" % (len(times), med * 1e3, p90 * 1e3))


def main(argv):
    try:
        if len(argv) == 4 and argv[1] == "create":
            create(argv[2], int(argv[3]))
        elif len(argv) == 3 and argv[1] == "stat":
            stat_tree(argv[2])
        elif len(argv) == 4 and argv[1] == "mktar":
            mktar(argv[2], int(argv[3]))
        elif len(argv) == 4 and argv[1] == "untar":
            os.mkdir(argv[3])
            timed("untar", ["tar", "-xf", argv[2], "-C", argv[3]])
        elif len(argv) == 3 and argv[1] == "rmtree":
            timed("rmtree", ["rm", "-rf", "--", argv[2]])
        elif len(argv) == 3 and argv[1] == "lslr":
            lslr(argv[2])
        elif len(argv) == 3 and argv[1] == "firstbyte":
            firstbyte(argv[2])
        else:
            sys.stderr.write(__doc__)
            return 2
    except (OSError, ValueError, Exception) as e:
        sys.stderr.write("smallfiles.py %s: %s\n" % (" ".join(argv[1:]), e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
