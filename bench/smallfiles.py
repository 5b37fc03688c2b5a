#!/usr/bin/env python3
"""Small-file metadata benchmark for ferryfs (standard library only).

Usage:
  smallfiles.py create DIR N   create DIR (must not exist) holding N files of 4 KiB,
                               1000 per subdirectory (DIR/d0000/f0000000, ...)
  smallfiles.py stat DIR       os.lstat() every entry under DIR, recursively

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


def main(argv):
    try:
        if len(argv) == 4 and argv[1] == "create":
            create(argv[2], int(argv[3]))
        elif len(argv) == 3 and argv[1] == "stat":
            stat_tree(argv[2])
        else:
            sys.stderr.write(__doc__)
            return 2
    except (OSError, ValueError) as e:
        sys.stderr.write("smallfiles.py %s: %s\n" % (" ".join(argv[1:]), e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
