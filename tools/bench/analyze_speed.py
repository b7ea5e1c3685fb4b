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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1]

from vnet.analysis.bulk import read_hosts
from vnet.analysis.report import analyze


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("events", type=int, nargs="?", default=10_000_000)
    ap.add_argument("--hooks", type=int, default=5)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vnet-bench-"))
    try:
        t = time.perf_counter()
        # generated in a child process: the peak memory below is the analysis's own
        subprocess.run([sys.executable, str(TOOLS / "synth_trace.py"), str(tmp), "--packets",
                        str(a.events // a.hooks), "--hooks", str(a.hooks), "--hosts", "2", "--delays-us", "5,20,8,3",
                        "--jitter-ns", "2000", "--fraction", "0.01", "--drop-after", "2", "--drop-fraction", "0.001"],
                       check=True, stdout=subprocess.DEVNULL)
        size = sum(p.stat().st_size for p in tmp.iterdir())
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
