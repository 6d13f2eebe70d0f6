#!/usr/bin/env python3
"""Summarises the group-commit writer's debug log and the directory's incident timings.

Run the server with
    RUST_LOG=warn,shers::actors::incidents=info,shers::persistence::group=debug shers serve ... 2> server.log
drive a loadgen scenario against it, then
    scripts/writer-phases.py server.log

Prints, per kind of batch (incident writes, deferred appends), the median total time and when
each pipelined part finished (PostgreSQL only logs the parts), and the percentiles of the
directory's reserve / prefetch-wait / write times per new incident. Reads no patient data:
the log lines it reads carry counts and durations only.
"""

import collections
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
PARTS = re.compile(r"begin_ms=([0-9.]+) writes_ms=([0-9.]+) appends_ms=([0-9.]+)")
BATCH = re.compile(r"writes=(\d+) appends=(\d+) replayed=(\w+) ms=([0-9.]+)")
CREATED = re.compile(
    r"reserve_ms=([0-9.]+).*?(?:prefetch_wait_ms=([0-9.]+).*?)?store_ms=([0-9.]+)"
)


def quantile(values, q):
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] if ordered else float("nan")


def bucket(n, size, top):
    """`n` itself below `size`, then ranges of `size`, then `top+`."""
    if n < size:
        return f"{n}"
    if n >= top:
        return f"{top}+"
    low = n // size * size
    return f"{low}-{low + size - 1}"


def main(path):
    parts = None
    batches = collections.defaultdict(list)
    replays = 0
    created = {"reserve": [], "prefetch wait": [], "write": []}
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            line = ANSI.sub("", line)
            m = PARTS.search(line)
            if m:
                parts = tuple(float(x) for x in m.groups())
                continue
            m = BATCH.search(line)
            if m:
                writes, appends = int(m.group(1)), int(m.group(2))
                replays += m.group(3) == "true"
                key = (bucket(writes, 5, 20), bucket(appends, 5, 20))
                if "alone=true" in line:
                    # One atomic statement outside a transaction (no parts to show).
                    key = ("1 alone", key[1])
                batches[key].append((float(m.group(4)),) + (parts or (None, None, None)))
                parts = None
                continue
            m = CREATED.search(line)
            if m and "incident created" in line:
                created["reserve"].append(float(m.group(1)))
                if m.group(2) is not None:
                    created["prefetch wait"].append(float(m.group(2)))
                created["write"].append(float(m.group(3)))
    total = sum(len(v) for v in batches.values())
    print(f"batches: {total}, replayed: {replays}")
    print(f"{'writes':>7} {'appends':>7} {'count':>6} {'total p50':>9} {'p90':>6} "
          f"{'BEGIN':>6} {'writes':>6} {'appends':>7}   (ms; parts: PostgreSQL)")
    def order(key):
        return tuple(int(k.split('-')[0].split(' ')[0].rstrip('+')) for k in key)

    for (writes, appends), rows in sorted(batches.items(), key=lambda kv: order(kv[0])):
        med = [quantile([r[i] for r in rows if r[i] is not None], 0.5) for i in range(1, 4)]
        print(f"{writes:>7} {appends:>7} {len(rows):>6} {quantile([r[0] for r in rows], 0.5):>9.2f} "
              f"{quantile([r[0] for r in rows], 0.9):>6.2f} {med[0]:>6.2f} {med[1]:>6.2f} {med[2]:>7.2f}")
    if created["write"]:
        print(f"\nnew incidents: {len(created['write'])}")
        for name, values in created.items():
            if values:
                print(f"{name:>14}: p50 {quantile(values, 0.5):.2f}  p90 {quantile(values, 0.9):.2f}  "
                      f"p99 {quantile(values, 0.99):.2f} ms")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
