#!/usr/bin/env python3
"""Where `vnet trace`'s time to first event goes: first_event.py's commands (vnet-dev, vnet-tp),
run on the same veth pair and flow, each with marks at its steps (ms from just before exec):
the interpreter up, vnet.cli.trace imported, the options parsed, plans selected, each object
opened / loaded / attached (device probes), the first poll and the first events.

The marks come from wrappers put around those functions in the child before vnet.cli.main runs
(`--child`); nothing in vnet is changed. Prints each run, then the median (and min) per mark.

Needs root. Usage: start_phases.py [--runs 11] [--only vnet-dev,vnet-tp]
"""

from __future__ import annotations

import os
import sys
import time

# Only these before the child's first mark; argparse, statistics, subprocess: main() only.
HERE = os.path.dirname(os.path.realpath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def child(argv: list[str]) -> None:
    """In the traced process: wrap the steps, then run `vnet ARGV` as the entry point would."""
    t0 = float(os.environ["VNET_PHASES_T0"])
    marks: list[tuple[float, str]] = []

    def mark(what: str) -> None:
        marks.append((time.time() - t0, what))

    mark("interpreter up")
    import atexit

    atexit.register(lambda: print("PHASES " + " | ".join(f"{t * 1000:.1f} {w}" for t, w in marks),
                                  file=sys.stderr))

    def wrap(owner, name: str, label: str) -> None:
        orig = getattr(owner, name)

        def wrapper(*a, **k):
            mark(f"{label} start")
            try:
                return orig(*a, **k)
            finally:
                mark(f"{label} end")

        setattr(owner, name, wrapper)

    import vnet.cli.main
    import vnet.cli.trace as trace_cmd

    mark("vnet.cli.trace imported")
    from vnet.binding import object as obj_mod
    from vnet.cli import params
    from vnet.probes import device
    from vnet.trace import session

    parse = params.FastParser.parse

    def parsed(self, args):
        out = parse(self, args)
        mark("options parsed")
        return out

    params.FastParser.parse = parsed
    wrap(trace_cmd, "select", "select")
    wrap(obj_mod.BpfObject, "__init__", "open")
    wrap(obj_mod.BpfObject, "load", "load")
    wrap(device, "attach", "attach")
    poll = session.Trace.poll

    def polled(self, *a, **k):
        if not any(w == "first poll" for _, w in marks):
            mark("first poll")
        out = poll(self, *a, **k)
        if out and not any(w == "first events" for _, w in marks):
            mark("first events")
        return out

    session.Trace.poll = polled
    sys.argv = ["vnet", *argv]
    vnet.cli.main.main()


def main() -> None:
    import argparse
    import statistics
    import subprocess

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--only", default="vnet-dev,vnet-tp")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("start_phases.py needs root")
    sys.path.insert(0, HERE)
    sys.path.insert(0, ROOT)
    import first_event as fe
    from vnet.topology import veth_pair

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = "/tmp/vnet-start-phases-pycache"  # bytecode kept, as installed
    with veth_pair(97) as net:
        sender = fe.Sender(net.ns1, net.ip2)
        try:
            for name, cmd in fe.commands(net.ns2, net.if2).items():
                if name not in args.only.split(","):
                    continue
                argv = cmd[cmd.index("vnet") + 1:]
                runs: list[dict[str, float]] = []
                for i in range(args.runs + 1):  # the first run warms the page cache and bytecode
                    env["VNET_PHASES_T0"] = repr(time.time())
                    r = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True,
                                       cwd=ROOT, env=env, preexec_fn=fe.own_tracefs, timeout=60)
                    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("PHASES ")), None)
                    if line is None:
                        raise SystemExit(f"{name}: no marks (exit {r.returncode}):\n{r.stderr}")
                    if i:
                        print(f"{name}: {line[7:]}", flush=True)
                        runs.append({w: float(t) for t, w in (p.split(" ", 1) for p in line[7:].split(" | "))})
                print(f"\n{name}: median (min) ms from exec, {len(runs)} runs")
                for mark in runs[0]:
                    vals = [r[mark] for r in runs if mark in r]
                    print(f"  {statistics.median(vals):7.1f} ({min(vals):6.1f})  {mark}")
                print()
        finally:
            sender.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.path.insert(0, ROOT)
        child(sys.argv[2:])
    else:
        main()
