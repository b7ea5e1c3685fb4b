#!/usr/bin/env python3
"""Scheduler probe cost: nanoseconds per run of sched:runq's programs (issue 10, benchmark 4).

sched:runq runs at every wakeup and every context switch of the host, whoever
it watches. hook_cost.py [3] sees only the few switches of a UDP flood; here a
context-switch storm drives them: two processes pinned to one CPU pass a byte
back and forth through two pipes, so each round trip is two wakeups and two
switches. The programs are loaded by vnet's own loader (`vnet trace -p
sched:runq --pid ...`), timed by the kernel's run-time statistics (run_time_ns /
run_cnt), in alternating rounds of:

 - nobody's threads but pid 1's watched: the path of a thread nobody watches,
   which nearly every switch of a traced host takes;
 - the storm's parent process watched: its wakeups record the time, its
   switch-ins emit an event (a thread the user asked for);
 - empty raw_tp programs at the same tracepoints: the floor (the tracepoint's
   dispatch and the statistics' own clock reads), subtracted as `net`.

With --compare-to REV the objects committed at REV (--compare-dir: those in DIR)
run as cases of their own in the same rounds, and a last table gives this tree / REV. Needs root.

Usage: sched_cost.py [--rounds N] [--trips N] [--compare-to REV | --compare-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hook_cost as hc  # noqa: E402  (also puts the checkout on sys.path)

from vnet.binding import program_info, run_time_stats  # noqa: E402
from vnet.probes import catalog  # noqa: E402
from vnet.probes import resolve as resolver  # noqa: E402
from vnet.trace.session import Trace  # noqa: E402

# Two processes on one CPU, `n` round trips through two pipes once a line arrives on stdin.
STORM = r"""
import os, sys
n = int(sys.argv[1])
r1, w1 = os.pipe()
r2, w2 = os.pipe()
child = os.fork()
if child == 0:
    for _ in range(n):
        os.read(r1, 1)
        os.write(w2, b"x")
    os._exit(0)
print(os.getpid(), child, flush=True)
sys.stdin.readline()
for _ in range(n):
    os.write(w1, b"x")
    os.read(r2, 1)
os.waitpid(child, 0)
"""
PROGRAMS = {"sched_switch": "switch", "sched_wakeup": "wakeup"}  # tracepoint -> row name
MIN_RUNS = 1000
UNWATCHED = "threads nobody watches (pid 1 watched)"
WATCHED = "the storm's parent watched: events"
FLOOR = "empty raw_tp programs (floor)"


@contextlib.contextmanager
def storm(trips: int):
    """The storm's processes, waiting: yields (parent pid, go) where go() runs it to its end."""
    p = subprocess.Popen(["taskset", "-c", "0", sys.executable, "-c", STORM, str(trips)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        parent = int(p.stdout.readline().split()[0])

        def go() -> None:
            p.stdin.write("\n")
            p.stdin.flush()
            if p.wait(timeout=120) != 0:
                raise SystemExit(f"the storm exited with {p.returncode}")

        yield parent, go
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def measure(progs: dict[str, int], go) -> dict[str, tuple[float, int]]:
    """ns per run and runs of each program while the storm runs."""
    before = {k: program_info(fd) for k, fd in progs.items()}
    go()
    after = {k: program_info(fd) for k, fd in progs.items()}
    out = {}
    for k in progs:
        n = after[k].run_cnt - before[k].run_cnt
        out[k] = ((after[k].run_time_ns - before[k].run_time_ns) / n if n else 0.0, n)
    return out


def run_case(watch_storm: bool, trips: int, objdir: Path | None) -> dict[str, tuple[float, int]]:
    with storm(trips) as (parent, go):
        res = resolver.resolve(catalog.BY_NAME["sched:runq"], "tp_btf")
        plan = resolver.plan(res, pids=(parent,) if watch_storm else (1,))
        trace = Trace([plan], ring_bytes=hc.RING_BYTES)
        with hc.objects_from(objdir):
            trace.start()
        with contextlib.closing(trace):
            obj = trace.objects[0]
            progs = {PROGRAMS[name.removeprefix("vnet_tp_btf_")]: obj.programs[name].fd
                     for name in plan.programs if name.removeprefix("vnet_tp_btf_") in PROGRAMS}
            with hc.draining(trace):
                got = measure(progs, go)
            lost = trace.stats().lost
            if lost:
                print(f"  ({lost} events lost in a round: counted, the ring was full)", flush=True)
            return got


def run_floor(trips: int) -> dict[str, tuple[float, int]]:
    fds: list[int] = []
    try:
        progs = {}
        for tp, row in PROGRAMS.items():
            fd = hc.load_empty(hc.BPF_PROG_TYPE_RAW_TRACEPOINT, 0)
            fds.append(fd)
            fds.append(hc.raw_tracepoint_open(tp, fd))
            progs[row] = fd
        with storm(trips) as (_, go):
            return measure(progs, go)
    finally:
        for fd in reversed(fds):
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    ap.add_argument("--trips", type=int, default=20000, help="round trips per round (default 20000)")
    ap.add_argument("--compare-to", metavar="REV", help="also the objects committed at git revision REV")
    ap.add_argument("--compare-dir", metavar="DIR", help="also the objects in DIR (a scratch build of a variant)")
    args = ap.parse_args()
    if args.compare_to and args.compare_dir:
        sys.exit("--compare-to, --compare-dir: one comparison at a time")
    if os.geteuid() != 0:
        sys.exit("needs root (loads eBPF)")
    with tempfile.TemporaryDirectory(prefix="vnet-sched-cost-") as tmp:
        cases: list[tuple[str, bool | None, Path | None]] = [(UNWATCHED, False, None), (WATCHED, True, None)]
        other = args.compare_to or (args.compare_dir and Path(args.compare_dir).name)
        if other:
            objdir = (hc.committed_objects(args.compare_to, Path(tmp)) if args.compare_to
                      else Path(args.compare_dir).resolve())
            cases += [(f"{UNWATCHED} @{other}", False, objdir), (f"{WATCHED} @{other}", True, objdir)]
        cases.append((FLOOR, None, None))
        samples: dict[tuple[str, str], list[float]] = {}
        runs: dict[tuple[str, str], list[int]] = {}
        with run_time_stats():
            for _, order in hc.rotations(cases, args.rounds):
                for label, watch_storm, objdir in order:
                    got = run_floor(args.trips) if watch_storm is None else run_case(watch_storm, args.trips, objdir)
                    for row, (ns, n) in got.items():
                        samples.setdefault((label, row), []).append(ns)
                        runs.setdefault((label, row), []).append(n)
    print(f"sched_cost.py {datetime.date.today()} kernel {platform.release()} {os.cpu_count()} CPUs: "
          f"{args.trips} round trips per round (2 wakeups, 2 switches each) on CPU 0, {args.rounds} alternating "
          f"rounds; ns per run, median (min-max); net = median - the floor's")
    floor = {row: statistics.median(samples[(FLOOR, row)]) for row in PROGRAMS.values() if (FLOOR, row) in samples}
    print(f"  {'case':<62} {'program':<8} {'median':>7} {'min':>7} {'max':>7} {'net':>7} {'runs/round':>10}")
    nets = {}
    for (label, row), v in samples.items():
        n = statistics.median(runs[(label, row)])
        if n < MIN_RUNS:
            continue
        med = statistics.median(v)
        net = med - floor[row] if label != FLOOR and row in floor else None
        nets[(label, row)] = net
        print(f"  {label:<62} {row:<8} {med:>7.1f} {min(v):>7.1f} {max(v):>7.1f} "
              + (f"{net:>7.1f}" if net is not None else f"{'':>7}") + f" {n:>10.0f}")
    if other:
        print(f"  this tree / {other}, net:")
        for label in (UNWATCHED, WATCHED):
            for row in PROGRAMS.values():
                new, old = nets.get((label, row)), nets.get((f"{label} @{other}", row))
                if new is not None and old:
                    print(f"    {label:<60} {row:<8} {new:7.1f} / {old:7.1f} = {new / old:.2f}")


if __name__ == "__main__":
    main()
