#!/usr/bin/env python3
"""How fast `vnet analyze` is: decode + path join + percentiles over synthetic trace files.

Writes N events (packets x hooks, 2 hosts, with injected delays, drops, sched records
and a clock offset) with tools/synth_trace.py into a scratch directory, then runs the
analysis (read_table + analyze: what `vnet analyze` does) in a fresh process per run
and reports events/s, the CPU of the joining process and of its decoder processes,
and the peak resident memory of each.

With --compare-to REV the same runs alternate with the code of git revision REV
(checked out into a temporary worktree), so that both are measured side by side
on this noisy shared machine and reported as a ratio.

    .venv/bin/python tools/bench/analyze_speed.py [EVENTS] [--runs 3] [--compare-to REV]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# One measured run, in a fresh interpreter whose current directory is the code to test.
RUN = r"""
import json, resource, sys, time
t0 = time.perf_counter()
try:
    from vnet.analysis.stream import read_table
    from vnet.analysis.report import analyze
    load = lambda p: read_table(p)
except ImportError:  # revisions before the streaming join
    from vnet.analysis.bulk import read_hosts as load
    from vnet.analysis.report import analyze
t1 = time.perf_counter()
c0 = resource.getrusage(resource.RUSAGE_SELF)
w0 = time.perf_counter()
data = load([sys.argv[1]])
report = analyze(data)
wall = time.perf_counter() - w0
me = resource.getrusage(resource.RUSAGE_SELF)
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
hosts = report["hosts"]
print(json.dumps({"wall": wall, "cpu": me.ru_utime + me.ru_stime - c0.ru_utime - c0.ru_stime,
                  "children_cpu": kids.ru_utime + kids.ru_stime, "rss_mib": me.ru_maxrss / 1024,
                  "children_rss_mib": kids.ru_maxrss / 1024, "events": sum(h["records"] for h in hosts),
                  "verdict": report["verdict"]}))
"""


def run_once(code_dir: Path, data: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", RUN, str(data)], cwd=code_dir, capture_output=True, text=True,
                         env={"PYTHONPATH": str(code_dir), "PATH": "/usr/bin:/bin"})
    if out.returncode:
        raise SystemExit(f"analyze_speed: the run in {code_dir} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("events", type=int, nargs="?", default=10_000_000)
    ap.add_argument("--hooks", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--compare-to", metavar="REV", help="alternate runs with this git revision's code")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vnet-bench-"))
    data, tree = tmp / "trace", tmp / "baseline"
    try:
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "tools" / "synth_trace.py"), str(data), "--packets",
                        str(a.events // a.hooks), "--hooks", str(a.hooks), "--hosts", "2", "--delays-us",
                        ",".join(["5", "20", "8", "3", "4", "6", "2"][:a.hooks - 1]), "--jitter-ns", "2000",
                        "--fraction", "0.01", "--drop-after", "2", "--drop-fraction", "0.001"],
                       check=True, stdout=subprocess.DEVNULL)
        size = sum(p.stat().st_size for p in data.iterdir())
        print(f"wrote {a.events} events ({size / 2**20:.0f} MiB, 2 hosts) in {time.perf_counter() - t:.1f} s")
        sides = [("this tree", ROOT)]
        if a.compare_to:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), a.compare_to],
                           check=True, capture_output=True)
            sides.append((a.compare_to, tree))
        results: dict[str, list[dict]] = {name: [] for name, _ in sides}
        for i in range(a.runs):
            for name, code in (sides if i % 2 == 0 else sides[::-1]):  # A B B A ...
                r = run_once(code, data)
                results[name].append(r)
                print(f"{name:>12}: {r['events'] / r['wall'] / 1e6:5.2f} M events/s  wall {r['wall']:.2f} s  "
                      f"cpu {r['cpu']:.2f} s (+ decoders {r['children_cpu']:.2f} s)  "
                      f"peak RSS {r['rss_mib']:.0f} MiB (decoders {r['children_rss_mib']:.0f} MiB)", flush=True)
        print()
        med = {}
        for name, rs in results.items():
            rate = statistics.median(r["events"] / r["wall"] for r in rs)
            rates = [r["events"] / r["wall"] / 1e6 for r in rs]
            med[name] = rate
            print(f"{name:>12}: median {rate / 1e6:.2f} M events/s (min {min(rates):.2f}, max {max(rates):.2f}), "
                  f"peak RSS {statistics.median(r['rss_mib'] for r in rs):.0f} MiB")
        if a.compare_to:
            print(f"ratio this tree / {a.compare_to}: {med['this tree'] / med[a.compare_to]:.2f}x events/s")
        print(results["this tree"][0]["verdict"])
    finally:
        if tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
