#!/usr/bin/env python3
"""Overhead on the traced data path (issue 10, benchmark 1): what tracing every hop
costs the packets, for vnet against tcpdump and bpftrace, side by side in one run.

The path: two namespace "VMs" behind a virtual switch in a host namespace
  bridge  vm1/eth0 --veth-- p1 [Linux bridge br0] p2 --veth-- vm2/eth0
  ovs     the same with a private Open vSwitch, userspace datapath, instead of br0

Load (tools/bench/udp_load.c, built here with gcc: make bench-deps):
  throughput  vm1 floods small UDP datagrams (--size) with sendmmsg for --seconds,
              pinned to one CPU; a sink in vm2 (recvmmsg, the other CPU) counts
              what arrives: packets/s received
  latency     --rr sequential request/response exchanges vm1 <-> vm2: p50, p99; both
              ends pinned to one CPU, so that an exchange's time is the path's and
              not the wakeup of an idle CPU (a halted vCPU here takes 60-75 us to
              wake, an exchange on one CPU 4 us); --rr-spread leaves them to the
              scheduler, which puts them on one CPU or on two from round to round

Tools, each attached before the load and stopped after it:
  none        nothing attached
  vnet        `vnet trace -w FILE`: TC ingress+egress of the four devices and the
              host-stack tracepoints net:net_dev_queue and net:netif_receive_skb,
              one event per packet per hop, to a file
  vnet-imm    `vnet` with `--immediate-mode`: each batch written as soon as it is read,
              not left to gather in the ring first (as tcpdump --immediate-mode)
  vnet-1ring  `vnet` with `--rings 1`: one event ring for every CPU, not one per CPU
  vnet-dev    `vnet trace -w FILE` at the devices only (TC), the hooks tcpdump has
  vnet-agg    the hooks of `vnet` with `--aggregate`: per-hook counters and hop-to-hop
              histograms in the kernel, no per-packet events
  tcpdump     `tcpdump -w FILE` on each of the four devices (its default snaplen)
  floor       empty programs (tools/bench/floor.bpf.c, built here with clang) at the
              8 hooks of `vnet`: what the hooks' dispatch alone costs the path, the
              bound any per-hop tracer starts from
  bpftrace    one bpftrace on the same tracepoints, printing a line per packet per
              hop (time, skb address, length, device) to a file; bpftrace cannot
              attach at TC, so it sees fewer hops than vnet does

  TOOL@REV    --compare-to REV: a vnet tool run with the code and the eBPF objects
              committed at REV (a temporary worktree), e.g. vnet-agg@REV beside
              vnet-agg: a before/after of a change from one run
  TOOL@build  --compare-dir DIR: a vnet tool run with this tree's code and the eBPF
              objects in DIR (a scratch build of bpf/src), beside the committed ones

Every round runs every tool once (the order rotates by round), so each figure is a
ratio to the `none` run of the same round; medians and min-max over --rounds are
printed, and the losses each tool reported. Over each flood it also reads from /proc
what share of a CPU the tool's own processes took (the reader, where it shares the
CPUs with the load), how much of the machine was idle, and the IPIs the sink's CPU
took per thousand packets received: RES, wakeups of the sink done by the sender's
CPU because the sink's was busy; CAL, wakeups queued to it while idle. Needs root.

Usage: datapath.py [--rounds 5] [--seconds 3] [--size 64] [--rr 5000]
                   [--topologies bridge,ovs]
                   [--tools none,floor,vnet,vnet-imm,vnet-1ring,vnet-dev,vnet-agg,tcpdump,bpftrace]
                   [--rr-spread] [--compare-to REV | --compare-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from vnet.topology import Topology, warm_up  # noqa: E402

PORT_FLOOD, PORT_RR = 9000, 9001
SUBNET = "10.177.0"
TOOLS = ("none", "floor", "vnet", "vnet-imm", "vnet-1ring", "vnet-dev", "vnet-agg", "tcpdump", "bpftrace")
HZ = os.sysconf("SC_CLK_TCK")
TRACEPOINTS = ("net:net_dev_queue", "net:netif_receive_skb")
BPFTRACE = ('tracepoint:net:net_dev_queue, tracepoint:net:netif_receive_skb '
            '{ printf("%llu %llx %u %s\\n", nsecs, args->skbaddr, args->len, str(args->name)); }')


@dataclass
class Path_:
    name: str
    vm1: str
    vm2: str
    ip2: str
    devices: list[tuple[str, str]]      # (netns, device) along the path


@dataclass
class Result:
    topology: str
    tool: str
    round: int
    pps: float = 0.0
    sent: int = 0
    received: int = 0
    p50_ns: int = 0
    p99_ns: int = 0
    exchanges: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)


def build_load(workdir: Path) -> Path:
    cc = shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise SystemExit("datapath.py: the load generator needs gcc or clang: run 'make bench-deps'")
    binary = workdir / "udp_load"
    subprocess.run([cc, "-O2", "-Wall", "-o", str(binary), str(Path(__file__).with_name("udp_load.c"))], check=True)
    return binary


def build_floor(workdir: Path) -> Path:
    obj = workdir / "floor.bpf.o"
    if not obj.exists():
        cc = shutil.which("clang")
        if cc is None:
            raise SystemExit("datapath.py: the floor programs need clang: run 'make deps'")
        subprocess.run([cc, "-O2", "-g", "-target", "bpf", "-c", str(Path(__file__).with_name("floor.bpf.c")),
                        "-o", str(obj)], check=True)
    return obj


def build_path(topo: Topology, kind: str, switch_holder: list) -> Path_:
    host = topo.add_netns("host")
    vms, ports = [], []
    for i in (1, 2):
        vm = topo.add_netns(f"vm{i}")
        port, vif = topo.add_veth_pair(f"p{i}", host, "eth0", vm)
        if kind == "ovs":  # the userspace datapath needs TX checksums filled in
            topo.disable_offloads(port, host)
            topo.disable_offloads(vif, vm)
        topo.add_address(vif, vm, f"{SUBNET}.{i}/24")
        vms.append(vm)
        ports.append(port)
    if kind == "bridge":
        br = topo.add_bridge("br0", host)
        for p in ports:
            topo.attach_to_bridge(p, host, br)
    else:
        from vnet.ovs import UserspaceSwitch

        sw = UserspaceSwitch(netns=host).start()
        switch_holder.append(sw)
        br = sw.add_bridge("br0")
        for p in ports:
            sw.add_port(br, p)
    for a, b in ((vms[0], f"{SUBNET}.2"), (vms[1], f"{SUBNET}.1")):
        warm_up(a, b, timeout=20)
    return Path_(kind, vms[0], vms[1], f"{SUBNET}.2",
                 [(vms[0], "eth0"), (host, ports[0]), (host, ports[1]), (vms[1], "eth0")])


class Tool:
    """One tracing tool attached to the path; stop() returns a note (its losses)."""

    def __init__(self, name: str, path: Path_, workdir: Path, rev: tuple[Path, Path] | None = None):
        """rev: (code, objects) of --compare-to for a TOOL@REV."""
        self.name, self.procs, self.workdir = name, [], workdir
        self.files: list[Path] = []
        self.env, self.cwd = None, None
        py = str(ROOT / ".venv" / "bin" / "python")
        if not os.path.exists(py):
            py = sys.executable
        name = name.split("@")[0]
        if rev is not None:
            self.env = {**os.environ, "PYTHONPATH": str(rev[0]), "VNET_BPF_DIR": str(rev[1])}
            self.cwd = rev[0]
        if name in ("vnet", "vnet-imm", "vnet-1ring", "vnet-dev", "vnet-agg"):
            out = workdir / "vnet.vnt"
            argv = [py, "-m", "vnet", "trace", *[a for ns, dev in path.devices for a in ("-i", f"{ns}/{dev}")],
                    *[a for tp in (TRACEPOINTS if name != "vnet-dev" else ()) for a in ("-p", tp)],
                    "--duration", "600"]
            argv += ["--aggregate"] if name == "vnet-agg" else ["-w", str(out)]
            argv += ["--immediate-mode"] if name == "vnet-imm" else ["--rings", "1"] if name == "vnet-1ring" else []
            self._start(argv, ready=b"vnet: tracing", stream="stderr")
            self.files.append(out)
        elif name == "floor":
            self._start([py, str(Path(__file__).with_name("floor_attach.py")), str(build_floor(workdir)),
                         *[f"{ns}/{dev}" for ns, dev in path.devices]], ready=b"floor: ready", stream="stderr")
        elif name == "tcpdump":
            for ns, dev in path.devices:
                out = workdir / f"tcpdump-{dev}.pcap"
                self._start(["ip", "netns", "exec", ns, "tcpdump", "-n", "-i", dev, "-w", str(out)],
                            ready=b"listening on", stream="stderr")
                self.files.append(out)
        elif name == "bpftrace":
            out = workdir / "bpftrace.txt"
            self._start(["bpftrace", "-o", str(out), "-e", BPFTRACE], ready=None, stream="stderr")
            self.files.append(out)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not (out.exists() and b"Attaching" in out.read_bytes()[:200]):
                if self.procs[-1].poll() is not None:
                    raise RuntimeError(f"bpftrace exited: {self.procs[-1].stderr.read().decode()[-500:]}")
                time.sleep(0.05)
            time.sleep(0.5)  # bpftrace says "Attaching" before its probes are all in

    def _start(self, argv: list[str], ready: bytes | None, stream: str) -> None:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL if stream == "stderr" else subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True, env=self.env, cwd=self.cwd)
        self.procs.append(p)
        if ready is None:
            return
        seen = b""
        deadline = time.monotonic() + 30
        os.set_blocking(p.stderr.fileno(), False)
        while ready not in seen:
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError(f"{argv[0]} did not start: {seen.decode(errors='replace')[-500:]}")
            chunk = p.stderr.read() or b""
            seen += chunk
            time.sleep(0.02)
        self._seen = seen

    def stop(self) -> str:
        notes = []
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            try:
                os.set_blocking(p.stderr.fileno(), True)
                err = p.stderr.read().decode(errors="replace")
            except (OSError, ValueError):
                err = ""
            m = re.search(r"(\d+) lost", err) or re.search(r"(\d+) packets dropped by kernel", err)
            if m:
                notes.append(m.group(0))
        sizes = sum(f.stat().st_size for f in self.files if f.exists())
        for f in self.files:
            f.unlink(missing_ok=True)
        return "; ".join(notes) + (f"; {sizes / 1e6:.0f} MB written" if sizes else "")


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(CPU ticks the processes `pids` have used, their threads' and reaped children's too;
    the machine's idle ticks), from /proc: free to read, unlike BPF run-time statistics,
    which would add two clock reads to every program run being measured."""
    used = 0
    for pid in pids:
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        used += sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    idle = sum(int(x) for x in open("/proc/stat").readline().split()[4:6])  # idle iowait
    return used, idle


def wakeup_ipis(cpu: int) -> tuple[int, int]:
    """(reschedule, function-call) interrupts CPU `cpu` has taken (/proc/interrupts). Waking the
    sink on a busy CPU is a reschedule IPI, its wakeup done by the waker (the sender's CPU);
    on an idle one a function call, the wakeup done there (docs/benchmarks.md)."""
    counts = {}
    for line in open("/proc/interrupts"):
        name, _, rest = line.strip().partition(":")
        if name in ("RES", "CAL"):
            counts[name] = int(rest.split()[cpu])
    return counts.get("RES", 0), counts.get("CAL", 0)


def run_load(load: Path, path: Path_, seconds: float, size: int, rr: int, tracer: list[int] = (),
             rr_spread: bool = False) -> dict:
    def ns_exec(ns, *argv, cpu=None):
        pre = ["taskset", "-c", str(cpu)] if cpu is not None else []
        return ["ip", "netns", "exec", ns, *pre, str(load), *map(str, argv)]

    cpus = sorted(os.sched_getaffinity(0))
    sink = subprocess.Popen(ns_exec(path.vm2, "sink", PORT_FLOOD, seconds + 2, cpu=cpus[-1]), stdout=subprocess.PIPE,
                            text=True)
    assert sink.stdout.readline().strip() == "ready"
    t0, (used0, idle0), ipi0 = time.monotonic(), cpu_ticks(tracer), wakeup_ipis(cpus[-1])
    flood = subprocess.run(ns_exec(path.vm1, "flood", path.ip2, PORT_FLOOD, size, seconds, cpu=cpus[0]),
                           capture_output=True, text=True, timeout=seconds + 30)
    (used1, idle1), wall, ipi1 = cpu_ticks(tracer), time.monotonic() - t0, wakeup_ipis(cpus[-1])
    out, _ = sink.communicate(timeout=seconds + 30)
    sent = int(flood.stdout.split()[1])
    _, got, first, last = out.split()
    got, first, last = int(got), int(first), int(last)
    rr_cpu = None if rr_spread else cpus[0]
    server = subprocess.Popen(ns_exec(path.vm2, "rr-server", PORT_RR, 120, cpu=rr_cpu), stdout=subprocess.PIPE,
                              text=True)
    assert server.stdout.readline().strip() == "ready"
    client = subprocess.run(ns_exec(path.vm1, "rr-client", path.ip2, PORT_RR, size, rr, cpu=rr_cpu),
                            capture_output=True, text=True, timeout=300)
    server.kill()
    server.wait()
    rtt = [int(x) for x in client.stdout.split()[1:]]
    pick = lambda q: rtt[min(len(rtt) - 1, int(q * len(rtt)))] if rtt else 0  # noqa: E731
    return {"sent": sent, "received": got, "pps": got / max(1e-9, (last - first) / 1e9), "p50_ns": pick(0.5),
            "p99_ns": pick(0.99), "exchanges": len(rtt),
            # shares of one CPU over the flood: what the tracer's own processes took, what was idle
            "extra": {"tracer_cpu": (used1 - used0) / HZ / wall, "idle_cpu": (idle1 - idle0) / HZ / wall,
                      # per received packet, the sink's CPU: reschedule IPIs (wakeups the sender's CPU did)
                      "res_per_kpkt": (ipi1[0] - ipi0[0]) * 1e3 / max(got, 1),
                      "cal_per_kpkt": (ipi1[1] - ipi0[1]) * 1e3 / max(got, 1)}}


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(results: list[Result], args) -> list[str]:
    lines = [f"datapath.py {time.strftime('%Y-%m-%d')} kernel {os.uname().release} {os.cpu_count()} CPUs; "
             f"{args.rounds} rounds x {args.seconds:g} s flood of {args.size}-byte UDP payloads, {args.rr} "
             f"request/response exchanges; ratios to the `none` run of the same round, median (min-max)"]
    for topo in dict.fromkeys(r.topology for r in results):
        lines.append(f"\n[{topo}]")
        lines.append(f"  {'tool':<9} {'k packets/s':>22} {'pps / none':>22} {'rr p50 us':>18} {'p50 / none':>22} "
                     f"{'p99 / none':>22} {'tracer %CPU':>16} {'idle %CPU':>16} {'RES/k pkt':>12} "
                     f"{'CAL/k pkt':>12}  notes")
        base = {r.round: r for r in results if r.topology == topo and r.tool == "none"}
        for tool in dict.fromkeys(r.tool for r in results if r.topology == topo):
            rs = [r for r in results if r.topology == topo and r.tool == tool]
            ratio = lambda key: [getattr(r, key) / getattr(base[r.round], key) for r in rs  # noqa: E731
                                 if r.round in base and getattr(base[r.round], key)]
            notes = "; ".join(dict.fromkeys(r.note for r in rs if r.note))
            lines.append(f"  {tool:<9} {fmt([r.pps / 1e3 for r in rs], 1):>22} {fmt(ratio('pps')):>22} "
                         f"{fmt([r.p50_ns / 1e3 for r in rs], 1):>18} {fmt(ratio('p50_ns')):>22} "
                         f"{fmt(ratio('p99_ns')):>22} {fmt([100 * r.extra['tracer_cpu'] for r in rs], 0):>16} "
                         f"{fmt([100 * r.extra['idle_cpu'] for r in rs], 0):>16} "
                         f"{statistics.median([r.extra['res_per_kpkt'] for r in rs]):>12.1f} "
                         f"{statistics.median([r.extra['cal_per_kpkt'] for r in rs]):>12.1f}  {notes[:120]}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=64, help="UDP payload bytes (64-256)")
    ap.add_argument("--rr", type=int, default=5000, help="request/response exchanges per run")
    ap.add_argument("--rr-spread", action="store_true",
                    help="leave the exchanges' two ends to the scheduler (default: both on one CPU)")
    ap.add_argument("--topologies", default="bridge,ovs")
    ap.add_argument("--tools", default=",".join(TOOLS))
    against = ap.add_mutually_exclusive_group()
    against.add_argument("--compare-to", metavar="REV", help="TOOL@REV in --tools runs with REV's code and objects")
    against.add_argument("--compare-dir", metavar="DIR", type=Path,
                         help="TOOL@build in --tools runs with this tree's code and the objects in DIR")
    args = ap.parse_args()
    if args.compare_dir and not sorted(args.compare_dir.glob("*.bpf.o")):
        sys.exit(f"datapath.py: --compare-dir {args.compare_dir}: no *.bpf.o there")
    suffix = args.compare_to or ("build" if args.compare_dir else None)
    if os.geteuid() != 0:
        sys.exit("datapath.py: needs root (namespaces, eBPF)")
    tools = [t for t in args.tools.split(",") if t]
    bad = [t for t in tools if t.split("@")[0] not in TOOLS or ("@" in t and t.split("@", 1)[1] != suffix)]
    if bad:
        sys.exit(f"datapath.py: unknown tool {bad[0]!r} (tools: {', '.join(TOOLS)}; "
                 "TOOL@REV with --compare-to REV, TOOL@build with --compare-dir DIR)")
    missing = [t for t in tools if t in ("tcpdump", "bpftrace") and not shutil.which(t)]
    if missing:
        sys.exit(f"datapath.py: {', '.join(missing)} not installed: run 'make bench-deps'")
    results: list[Result] = []
    mounted = False
    if "bpftrace" in tools and not os.path.exists("/sys/kernel/tracing/events"):
        # bpftrace reads tracepoint formats from tracefs (vnet needs none: tp_btf and BTF)
        subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"], check=True)
        mounted = True
    try:
        return _run(args, tools, results)
    finally:
        if mounted:
            subprocess.run(["umount", "/sys/kernel/tracing"], check=False)


def _run(args, tools: list[str], results: list[Result]) -> int:
    with tempfile.TemporaryDirectory(prefix="vnet-datapath-") as tmp:
        work = Path(tmp)
        load = build_load(work)
        rev = (ROOT, args.compare_dir.resolve()) if args.compare_dir else None
        if args.compare_to:
            rev = (work / "rev", work / "rev-bpf")
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(rev[0]), args.compare_to],
                           check=True, capture_output=True)
            rev[1].mkdir()
            for name in subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", args.compare_to,
                                        "bpf/build/"], check=True, capture_output=True, text=True).stdout.split():
                (rev[1] / Path(name).name).write_bytes(subprocess.run(
                    ["git", "-C", str(ROOT), "show", f"{args.compare_to}:{name}"], check=True,
                    capture_output=True).stdout)
        try:
            return _rounds(args, tools, results, work, load, rev)
        finally:
            if args.compare_to:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(rev[0])],
                               capture_output=True)


def _rounds(args, tools: list[str], results: list[Result], work: Path, load: Path, rev) -> int:
    for kind in args.topologies.split(","):
        switch: list = []
        with Topology() as topo:
            try:
                path = build_path(topo, kind, switch)
                for rnd in range(args.rounds):
                    order = tools[rnd % len(tools):] + tools[:rnd % len(tools)]
                    for tool in order:
                        t = Tool(tool, path, work, rev if "@" in tool else None) if tool != "none" else None
                        try:
                            m = run_load(load, path, args.seconds, args.size, args.rr,
                                         [p.pid for p in t.procs] if t else [], args.rr_spread)
                        finally:
                            note = t.stop() if t else ""
                        r = Result(kind, tool, rnd, note=note, **m)
                        results.append(r)
                        print(f"  {kind} round {rnd + 1} {tool:<9} {r.pps / 1e3:8.1f} k pps (sent "
                              f"{r.sent / args.seconds / 1e3:.0f} k/s), rr p50 {r.p50_ns / 1e3:.1f} us p99 "
                              f"{r.p99_ns / 1e3:.1f} us, tracer {100 * r.extra['tracer_cpu']:.0f}% of a CPU, "
                              f"idle {100 * r.extra['idle_cpu']:.0f}%, sink CPU IPIs/k pkt RES "
                              f"{r.extra['res_per_kpkt']:.1f} CAL {r.extra['cal_per_kpkt']:.1f}  {note}",
                              file=sys.stderr, flush=True)
            finally:
                for sw in switch:
                    sw.stop()
    print("\n".join(report(results, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
