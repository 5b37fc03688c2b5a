#!/usr/bin/env python3
"""Helpers for bench/run.sh (standard library only).

Usage:
  report.py fio JSON DIR METRIC [EXPECT_BYTES]
      Print one number from a fio --output-format=json file: DIR is read|write, METRIC is
      mibs (MiB/s) or iops. Fails when fio reported an error, moved no data, or moved a
      different number of bytes than EXPECT_BYTES (when given).
  report.py kv LINE KEY
      Print the value of KEY from a "word key=value key=value" line (smallfiles.py output).
  report.py table SPEC SAMPLES VARIANT...
      Print the Markdown results table. SPEC: lines "key<TAB>kind<TAB>label", kind is
      mibs|iops|secs; SAMPLES: lines "key<TAB>variant<TAB>run<TAB>value". Cells are medians.
      The first VARIANT is the baseline: each other variant gets an "x <baseline>" column,
      higher is better: variant/baseline for MiB/s and IOPS, baseline/variant for seconds
      (the same as comparing ops/s).
"""

import json
import statistics
import sys


def die(msg):
    sys.stderr.write("report.py: %s\n" % msg)
    sys.exit(1)


def fio_metric(path, ddir, metric, expect=None):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    # fio may print notes before the JSON document; start at the first "{".
    start = text.find("{")
    if start < 0:
        die("%s: no JSON in fio output:\n%s" % (path, text[:2000]))
    try:
        doc = json.loads(text[start:])
    except ValueError as e:
        die("%s: bad fio JSON (%s):\n%s" % (path, e, text[:2000]))
    jobs = doc.get("jobs") or []
    if len(jobs) != 1:
        die("%s: expected 1 fio job, found %d" % (path, len(jobs)))
    job = jobs[0]
    if job.get("error", 0) != 0:
        die("%s: fio job error %s" % (path, job.get("error")))
    d = job.get(ddir) or {}
    io_bytes = d.get("io_bytes", 0)
    if io_bytes <= 0:
        die("%s: fio moved no %s data" % (path, ddir))
    if expect is not None and io_bytes != expect:
        die("%s: fio %s %d bytes, expected %d" % (path, ddir, io_bytes, expect))
    if metric == "mibs":
        val = d["bw_bytes"] / 1048576.0
    elif metric == "iops":
        val = d["iops"]
    else:
        die("unknown metric %r" % metric)
    if val <= 0:
        die("%s: fio reported %s %s = %s" % (path, ddir, metric, val))
    print("%.6f" % val)


def kv(line, key):
    for word in line.split():
        k, sep, v = word.partition("=")
        if sep and k == key:
            print(v)
            return
    die("no %s= in %r" % (key, line))


def fmt(kind, v):
    if v is None:
        return "n/a"
    if kind == "mibs":
        return "%.1f" % v
    if kind == "iops":
        return "%.0f" % v
    return "%.3f" % v


def table(spec_path, samples_path, variants):
    spec = []
    with open(spec_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                key, kind, label = line.rstrip("\n").split("\t", 2)
                if kind not in ("mibs", "iops", "secs"):
                    die("bad kind %r for %s" % (kind, key))
                spec.append((key, kind, label))
    samples = {}
    with open(samples_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                key, variant, _run, value = line.rstrip("\n").split("\t")
                samples.setdefault((key, variant), []).append(float(value))

    base = variants[0]
    others = variants[1:]
    head = ["workload"] + variants + ["%s x %s" % (v, base) for v in others]
    out = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for key, kind, label in spec:
        med = {}
        for v in variants:
            vals = samples.get((key, v))
            med[v] = statistics.median(vals) if vals else None
        row = [label] + [fmt(kind, med[v]) for v in variants]
        for v in others:
            b, x = med[base], med[v]
            if b is None or x is None or b <= 0 or x <= 0:
                row.append("n/a")
            else:
                row.append("%.2fx" % ((b / x) if kind == "secs" else (x / b)))
        out.append("| " + " | ".join(row) + " |")

    out.append("")
    out.append("All runs (in order), same units:")
    out.append("")
    out.append("| workload | " + " | ".join(variants) + " |")
    out.append("|---|" + "|".join(["---:"] * len(variants)) + "|")
    for key, kind, label in spec:
        cells = [", ".join(fmt(kind, x) for x in samples.get((key, v), [])) or "n/a"
                 for v in variants]
        out.append("| " + label + " | " + " | ".join(cells) + " |")
    print("\n".join(out))


def main(argv):
    if len(argv) >= 5 and argv[1] == "fio":
        expect = int(argv[5]) if len(argv) > 5 else None
        fio_metric(argv[2], argv[3], argv[4], expect)
    elif len(argv) == 4 and argv[1] == "kv":
        kv(argv[2], argv[3])
    elif len(argv) >= 5 and argv[1] == "table":
        table(argv[2], argv[3], argv[4:])
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
