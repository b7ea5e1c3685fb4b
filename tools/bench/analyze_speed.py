#!/usr/bin/env python3
"""How fast `vnet analyze` is: decode + path join + percentiles over synthetic trace files.

Writes N events (packets x hooks, 2 hosts, with injected delays, sched records and a
clock offset) with tools/synth_trace.py into a scratch directory, then times
read_hosts (chunk by chunk: crc, msgpack, numpy views) and analyze (join, segments,
paths, tail, drops, sched) and reports events/s and the peak resident memory.

    .venv/bin/python tools/bench/analyze_speed.py [EVENTS] [--hooks K]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synth_trace import Spec, write  # noqa: E402

from vnet.analysis.bulk import read_hosts  # noqa: E402
from vnet.analysis.report import analyze  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("events", type=int, nargs="?", default=10_000_000)
    ap.add_argument("--hooks", type=int, default=5)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vnet-bench-"))
    try:
        spec = Spec(packets=a.events // a.hooks, hooks=a.hooks, hosts=2, delays_ns=[5_000, 20_000, 8_000, 3_000][
            :a.hooks - 1] + [4_000] * max(0, a.hooks - 5), jitter_ns=2_000, inject_segment=1, extra_ns=200_000,
            inject_fraction=0.01, chunk_records=8192, drop_after=2, drop_fraction=0.001)
        t = time.perf_counter()
        paths, _ = write(spec, tmp)
        size = sum(p.stat().st_size for p in paths)
        print(f"wrote {a.events} events ({size / 2**20:.0f} MiB, 2 hosts) in {time.perf_counter() - t:.1f} s")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        hosts = read_hosts([tmp])
        t1 = time.perf_counter()
        report = analyze(hosts)
        t2 = time.perf_counter()
        n = sum(h.records for h in hosts)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"decode {t1 - t0:.2f} s, join + percentiles {t2 - t1:.2f} s: {n} events in {t2 - t0:.2f} s = "
              f"{n / (t2 - t0) / 1e6:.2f} M events/s")
        print(f"peak RSS {rss / 1024:.0f} MiB (before reading: {rss0 / 1024:.0f} MiB; files: {size / 2**20:.0f} MiB)")
        print(report["verdict"])
    finally:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
