"""`vnet demo tail-latency`: the tail an I/O-bound "VM" gets from a CPU-bound neighbour.

The seed system's second case study (issue 9 B; on Xen it saw p99.9 x22): a
latency-sensitive UDP echo server shares one CPU with a CPU-bound "VM"; a client in
another VM measures request/response times, once without and once with the
neighbour, traced by vnet both times; `vnet analyze`'s code then says where the
added tail comes from::

    vm1 (netns): client, eth0 --veth-- tap1 \\
                                              br0 (host netns)
    vm2 (a process): echo server, its NIC --- tap2 /      (a tap device, as QEMU's)
    vm3 (netns): the hog                          CPU B: vm2 and, in the second run, vm3
                                                  CPU A: the client and the tracer

The echo server is a VM the way QEMU is one: a process that owns the tap device of
its NIC on the host bridge, reads frames from it and writes its answers back (a
small UDP stack of its own: the reply is the request with addresses and ports
swapped, whose checksums stay valid). It is not an application on a kernel socket
because on this kernel nothing probes a UDP socket read with the datagram in hand:
`udp_recvmsg` copies a linear datagram without the `skb_copy_datagram_iovec`
tracepoint (`sock:datagram_copy` sees only non-linear ones), and since 6.18 it
frees it with `skb_attempt_defer_free`, so `consume_skb` fires later on the CPU
that allocated it (the client's), with the wrong task. A tap read fires
`consume_skb` in the reading task at the moment it takes the frame
(`tun_do_read`), so the request's path ends where the VM has read it:
``vm1/eth0:egress -> ... -> host/tap2:egress -> sock:consume_skb host/tap2``, and
its last segment holds the VM's wakeup and run-queue wait, which the analysis joins
with `sched:runq` of the VM's thread (and names the thread that had the CPU).

Every process here is a separate process (the VM must wait for its CPU like a vCPU
thread, not share the demo's interpreter), pinned with sched_setaffinity, at the same
nice level in an autogroup of its own, so that the VM and the hog compete as equals
and unrelated load on a small machine disturbs both runs less. The client sends a
request every millisecond whatever came back, so a VM that waits for its CPU shows
up as late replies, not as fewer requests.

Two details make the effect show in every run rather than in some (measured on 6.18,
EEVDF, HZ=250). The VM spends 100 us of CPU on each request, as a guest's kernel and
application would: a VM that needs next to no CPU keeps a positive lag and preempts
the hog at almost every wakeup, and the tail then shows only at p99.9. And each
request leaves at a random point of its millisecond: a VM that wakes with a negative
lag waits for the next scheduler tick (up to 4 ms), and with strictly periodic
requests the phase against the tick, fixed for a whole run, decided whether a run
showed a tail at all (p99 x1 in some runs, x20 in others).

Everything started here stops by itself (deadlines, parent checks), is killed in
`finally`, and the tap vanishes with its process; the topology goes with its
`with` block.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import DemoContext, DemoResult

NAME = "tail-latency"
TITLE = "Tail latency: an I/O-bound VM sharing its CPU with a CPU-bound one"

ECHO_PORT = 7007
CLIENT_IP, VM_IP = "10.199.0.1", "10.199.0.2"
VM_MAC = "02:76:6e:00:00:02"
INTERVAL_S = 0.001            # one request per millisecond (at a random point in it), whatever came back
REQUESTS = {True: 3000, False: 8000}   # per run: quick (the test suite) / full
NICE = -5                     # the VM, the hog and the client alike
VM_WORK_US = 100              # CPU time the VM spends on each request (its guest's work)
VM_COMM, HOG_COMM, CLIENT_COMM = "vnet-echo-vm", "vnet-hog", "vnet-client"
START_TIMEOUT = 20.0          # a child or the tracer reporting ready
# The scenario's own checks of its answer.
MIN_TAIL_RATIO = 2.0          # p99 or p99.9 of the round trip, with / without the hog
MIN_SHARE = 0.5               # of the request path's tail time explained by run-queue wait
BUSY_TAIL_NS = 500_000        # a baseline round-trip p99 this slow: something else holds the CPUs

# The processes of the scenario: stdlib only (they start fast), one role each. Each
# pins itself, names itself (the comm the scheduler probe reports) and exits when its
# parent goes or its lifetime ends, so nothing outlives the demo even if it is killed.
_CHILD = r'''
import fcntl, json, os, random, select, socket, struct, sys, time
role, cpu, nice, life, comm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
parent, deadline = os.getppid(), time.monotonic() + life
os.sched_setaffinity(0, {cpu})
with open("/proc/self/comm", "w") as f:
    f.write(comm)
try:
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    with open("/proc/self/autogroup", "w") as f:  # a session of its own: an autogroup of its own
        f.write(str(nice))
except OSError:
    pass

def alive():
    return os.getppid() == parent and time.monotonic() < deadline

if role == "vm":  # the echo server VM: a tap device and a UDP echo of its own
    tap, mac, port = sys.argv[6], bytes.fromhex(sys.argv[7].replace(":", "")), int(sys.argv[8])
    work = float(sys.argv[9]) / 1e6  # CPU time per request: the guest's kernel and application
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", tap.encode(), 0x0002 | 0x1000))  # TUNSETIFF TAP|NO_PI
    print(json.dumps({"pid": os.getpid()}), flush=True)
    want = port.to_bytes(2, "big")
    while alive():
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        f = os.read(fd, 4096)
        if len(f) < 42 or f[12:14] != b"\x08\x00" or f[23] != 17 or f[0:6] != mac:
            continue  # not IPv4 UDP to us
        u = 14 + (f[14] & 15) * 4
        if f[u + 2:u + 4] != want:
            continue
        until = time.thread_time() + work
        while time.thread_time() < until:
            pass
        # swapped MACs, addresses and ports: the IP and UDP checksums stay valid
        os.write(fd, f[6:12] + mac + f[12:26] + f[30:34] + f[26:30] + f[34:u]
                 + f[u + 2:u + 4] + f[u:u + 2] + f[u + 4:])
elif role == "hog":
    print(json.dumps({"pid": os.getpid()}), flush=True)
    x = 0
    while alive():
        for _ in range(20000):
            x += 1
elif role == "client":
    dst, port, n, interval = sys.argv[6], int(sys.argv[7]), int(sys.argv[8]), float(sys.argv[9])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.setblocking(False)
    sent, rtt = [0] * n, {}
    pad = b"vnet-tail-latency-request"

    def take():
        while True:
            try:
                data = s.recv(2048)
            except BlockingIOError:
                return
            now = time.monotonic_ns()
            seq = struct.unpack_from("!I", data)[0]
            if seq < n and sent[seq] and seq not in rtt:
                rtt[seq] = now - sent[seq]

    print(json.dumps({"pid": os.getpid()}), flush=True)
    start = time.monotonic() + 0.02
    rnd = random.Random(n)
    for i in range(n):
        # one per interval, at a random point in it: the phase against the scheduler's tick varies
        due = start + (i + rnd.uniform(0.0, 0.9)) * interval
        while (left := due - time.monotonic()) > 0:
            if select.select([s], [], [], left)[0]:
                take()
        sent[i] = time.monotonic_ns()
        s.sendto(struct.pack("!I", i) + pad, (dst, port))  # 29 bytes
    end = time.monotonic() + 0.5
    while len(rtt) < n and (left := end - time.monotonic()) > 0:
        if select.select([s], [], [], left)[0]:
            take()
    print(json.dumps({"sent": n, "rtt_ns": [rtt.get(i, -1) for i in range(n)]}), flush=True)
'''

_SUMMARY = re.compile(r"vnet: (\d+) events printed, (\d+) received, (\d+) lost")


@dataclass
class _Net:
    topo: object
    host_ns: str
    bridge: str
    client_ns: str
    client_if: str
    client_port: str   # the client's bridge port (veth)
    hog_ns: str
    vm_tap: str = "tap2"


@dataclass
class _Run:
    label: str
    hog: bool
    trace: Path
    rtt_ns: list[int] = field(default_factory=list)   # -1: no reply
    vm_pid: int = 0
    hog_pid: int = 0
    tracer_stderr: str = ""
    lost_events: int | None = None
    report: dict | None = None       # analyze() of the request direction

    @property
    def replies(self) -> list[int]:
        return sorted(v for v in self.rtt_ns if v >= 0)


def _pct(sorted_values: list[int], q: float) -> int | None:
    """The q quantile of sorted values, nearest rank."""
    if not sorted_values:
        return None
    n = len(sorted_values)
    return int(sorted_values[min(n - 1, max(0, -(-round(q * 10000) * n // 10000) - 1))])  # ceil(q n) - 1


def _rtt_stats(run: _Run) -> dict:
    v = run.replies
    return {"requests": len(run.rtt_ns), "replies": len(v),
            "p50_ns": _pct(v, 0.50), "p90_ns": _pct(v, 0.90), "p99_ns": _pct(v, 0.99),
            "p999_ns": _pct(v, 0.999), "max_ns": v[-1] if v else None}


class _Procs:
    """The children of the scenario; close() kills (and reaps) every one still running."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 10.0) -> str:
        """Signal p, wait for it, return what is left of its stderr."""
        err = ""
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate(timeout=5)
        except ValueError:  # its pipes are closed already
            p.wait(timeout)
        if p in self.procs:
            self.procs.remove(p)
        return err or ""

    def close(self) -> None:
        for p in reversed(list(self.procs)):
            try:
                self.stop(p, timeout=5)
            except Exception:  # still stop the others
                pass


def _child(procs: _Procs, ns: str, role: str, cpu: int, life: float, comm: str, *args) -> tuple[subprocess.Popen, dict]:
    """A role of _CHILD in netns `ns`, once it said hello (its first line)."""
    argv = ["ip", "netns", "exec", ns, sys.executable, "-c", _CHILD, role, str(cpu), str(NICE), f"{life:.1f}",
            comm, *map(str, args)]
    p = procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        ready = sel.select(START_TIMEOUT)
    line = p.stdout.readline() if ready else ""
    if not line:
        err = procs.stop(p)
        raise RuntimeError(f"{comm} did not start (exit {p.returncode}): {err.strip()[-500:]}")
    return p, json.loads(line)


def _build(topo) -> _Net:
    """Host netns with a bridge; the client VM (netns, veth on the bridge); the hog's netns.
    The echo VM's tap comes with its process (_start_vm)."""
    host = topo.add_netns("host")
    bridge = topo.add_bridge("br0", host)
    vm1 = topo.add_netns("vm1")
    port, vif = topo.add_veth_pair("tap1", host, "eth0", vm1)
    topo.attach_to_bridge(port, host, bridge)
    topo.disable_offloads(port, host)
    topo.disable_offloads(vif, vm1)
    topo.add_address(vif, vm1, f"{CLIENT_IP}/24")
    # the echo VM answers UDP only: its address is resolved statically, as a VM's ARP would
    topo.run(vm1, ["ip", "neigh", "replace", VM_IP, "lladdr", VM_MAC, "dev", vif, "nud", "permanent"])
    return _Net(topo, host, bridge, vm1, vif, port, topo.add_netns("vm3"))


def _idlest(cpus: list[int], sample_s: float = 0.3) -> int:
    """The CPU of `cpus` that was idle the most over a short sample (/proc/stat): the one
    the VM and the hog share, so that unrelated load disturbs the baseline the least."""
    def idle() -> dict[int, int]:
        out = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *vals = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    out[int(name[3:])] = int(vals[3]) + int(vals[4])  # idle + iowait
        return out

    try:
        a = idle()
        time.sleep(sample_s)
        b = idle()
        return max(cpus, key=lambda c: (b.get(c, 0) - a.get(c, 0), c))
    except (OSError, ValueError, IndexError):
        return cpus[-1]


def _start_vm(procs: _Procs, net: _Net, cpu: int, life: float) -> tuple[subprocess.Popen, int]:
    """The echo VM: its process creates the tap, which goes on the bridge; answers before it returns."""
    p, hello = _child(procs, net.host_ns, "vm", cpu, life, VM_COMM, net.vm_tap, VM_MAC, ECHO_PORT, VM_WORK_US)
    net.topo.attach_to_bridge(net.vm_tap, net.host_ns, net.bridge)
    net.topo.run(net.host_ns, ["ip", "link", "set", net.vm_tap, "up"])
    # until it answers: the tap is up, and the bridge has learnt the VM's MAC
    from vnet.topology import in_netns

    with in_netns(net.client_ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.settimeout(0.1)
        deadline = time.monotonic() + 5
        while True:
            s.sendto(b"\xff\xff\xff\xffwarm-up", (VM_IP, ECHO_PORT))
            try:
                s.recv(2048)
                break
            except TimeoutError:
                if time.monotonic() > deadline or p.poll() is not None:
                    raise RuntimeError(f"the echo VM does not answer on {net.vm_tap}") from None
    return p, hello["pid"]


def _start_tracer(procs: _Procs, net: _Net, vm_pid: int, out: Path, life: float, cpu: int,
                  snap: bool) -> subprocess.Popen:
    """`vnet trace -w` of the whole path and the VM's run-queue waits; returns once attached."""
    ifaces = [f"{net.client_ns}/{net.client_if}", f"{net.host_ns}/{net.client_port}", f"{net.host_ns}/{net.vm_tap}"]
    argv = ["taskset", "-c", str(cpu), sys.executable, "-m", "vnet", "trace",
            *[a for i in ifaces for a in ("-i", i)],
            "-p", "net:netif_receive_skb", "-p", "sock:consume_skb", "-p", "sched:runq", "--pid", str(vm_pid),
            "--proto", "udp", "--port", str(ECHO_PORT), *(["--snaplen", "64"] if snap else []),
            "--duration", f"{life:.1f}", "--strict", "-w", str(out)]
    p = procs.start(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    with selectors.DefaultSelector() as sel:
        sel.register(p.stderr, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0 and sel.select(left):
            line = p.stderr.readline()
            if not line:
                break
            seen.append(line)
            if line.startswith("vnet: tracing "):
                return p
    err = procs.stop(p)
    raise RuntimeError(f"vnet trace did not start (exit {p.returncode}): {(''.join(seen) + err).strip()[-800:]}")


def _measure(procs: _Procs, net: _Net, run: _Run, n: int, shared: int, other: int, snap: bool,
             step=lambda what, fraction: None) -> None:
    """One run: the echo VM (and the hog) on CPU `shared`, the client and the tracer on `other`."""
    life = n * INTERVAL_S + 40.0  # every child's own deadline: it stops by itself
    step("echo VM", 0.0)
    vm, run.vm_pid = _start_vm(procs, net, shared, life)
    try:
        step("attaching vnet trace", 0.1)
        tracer = _start_tracer(procs, net, run.vm_pid, run.trace, life, other, snap)
        hog = None
        if run.hog:
            step(f"starting {HOG_COMM}", 0.25)
            hog, hello = _child(procs, net.hog_ns, "hog", shared, life, HOG_COMM)
            run.hog_pid = hello["pid"]
            time.sleep(0.3)  # the hog has been running for a while when the requests start
        step(f"{n} requests, 1 per ms", 0.3)
        client, _ = _child(procs, net.client_ns, "client", other, life, CLIENT_COMM, VM_IP, ECHO_PORT, n, INTERVAL_S)
        try:
            out, err = client.communicate(timeout=life)
        except subprocess.TimeoutExpired:
            raise RuntimeError("the client did not finish") from None
        procs.procs.remove(client)
        if client.returncode != 0:
            raise RuntimeError(f"the client exited {client.returncode}: {err.strip()[-500:]}")
        run.rtt_ns = json.loads(out.strip().splitlines()[-1])["rtt_ns"]
        if hog is not None:
            procs.stop(hog)
        step("stopping vnet trace", 0.9)
        time.sleep(0.25)  # the ring's last events (the reader drains every 100 ms)
        # SIGINT: vnet trace drains the ring, writes the kernel's counters and the file's end
        run.tracer_stderr = procs.stop(tracer, signal.SIGINT, timeout=30)
        m = _SUMMARY.search(run.tracer_stderr)
        run.lost_events = int(m[3]) if m else None
        if tracer.returncode != 0:
            raise RuntimeError(f"vnet trace exited {tracer.returncode}: {run.tracer_stderr.strip()[-800:]}")
    finally:
        procs.stop(vm)


# -- analysis ---------------------------------------------------------------------------------------------


def _request_flow():
    from vnet.analysis.bulk import Flow

    return Flow(proto=17, dport=ECHO_PORT)


def _analyse(run: _Run):
    """`vnet analyze --proto udp --dport ECHO_PORT --slowest 5` of the run's trace: the request
    direction, whose path ends where the VM read the request. Returns (report, joined table)."""
    from vnet.analysis.report import analyze
    from vnet.analysis.stream import read_table

    table = read_table([run.trace], flow=_request_flow())
    return analyze(table, slowest=5), table


def _write_run(run: _Run, out: Path, interval_s: float) -> list[Path]:
    """A run's analysis and its client's round-trip times, as JSON files in out."""
    path = out / f"{run.label}.analysis.json"
    path.write_text(json.dumps(run.report, default=_plain, indent=1) + "\n")
    rtt = out / f"{run.label}.rtt.json"
    rtt.write_text(json.dumps({"interval_s": interval_s, **_rtt_stats(run), "rtt_ns": run.rtt_ns}) + "\n")
    return [path, rtt]


def _plain(o):
    try:
        return o.item()  # numpy scalars
    except AttributeError:
        raise TypeError(f"{type(o).__name__} is not JSON serializable") from None


def _main_path(report: dict) -> dict | None:
    """The request path that ends with the VM's read (the most common such path)."""
    full = [p for p in report.get("paths", []) if p["hops"][-1].startswith("sock:consume_skb")]
    return max(full, key=lambda p: p["count"]) if full else None


def _path_numbers(report: dict) -> dict:
    p = _main_path(report)
    if p is None:
        return {}
    segs = p["tail"]["segments"]
    last = segs[-1]
    return {
        "path": p["hops"], "packets": p["count"],
        "e2e": {k: p["e2e"][k] for k in ("p50_ns", "p99_ns", "p999_ns", "max_ns")},
        "tail_threshold_ns": p["tail"]["threshold_ns"],
        "tail_largest_segment": f"{segs[p['tail']['largest']]['from']} -> {segs[p['tail']['largest']]['to']}",
        "tail_share_vm_read": last["tail_share"],            # host/tap2:egress -> the VM's read
        "tail_share_network": sum(s["tail_share"] for s in segs[:-1]),
        "network_p99_ns": _network_p99(report, p),
    }


def _network_p99(report: dict, path: dict) -> int | None:
    """The largest p99 of the path's segments before the VM's read (the network's part)."""
    names = list(zip(path["hops"], path["hops"][1:]))[:-1]
    vals = [s["p99_ns"] for s in report["segments"] if (s["from"], s["to"]) in names]
    return max(vals) if vals else None


def _ratio(a, b) -> float | None:
    return round(a / b, 2) if a and b else None


def _us(ns) -> str:
    if ns is None:
        return "?"
    return f"{ns / 1000:.0f} us" if ns < 10_000_000 else f"{ns / 1e6:.1f} ms"


def _judge(alone: _Run, hog: _Run) -> tuple[dict, str, bool, str]:
    """Numbers, verdict, ok and why, from both runs' client measurements and analyses."""
    ra, rh = _rtt_stats(alone), _rtt_stats(hog)
    pa, ph = _path_numbers(alone.report or {}), _path_numbers(hog.report or {})
    sched = (hog.report or {}).get("sched") or {}
    threads = sched.get("threads") or []
    top = threads[0] if threads else {}
    taken_by = top.get("cpu_taken_by", "")
    ratios = {q: _ratio(rh[f"{q}_ns"], ra[f"{q}_ns"]) for q in ("p50", "p99", "p999")}
    numbers = {
        "rtt": {"alone": ra, "with_hog": rh, "ratio": ratios},
        "request_path": {"alone": pa, "with_hog": ph,  # client vNIC -> the VM's read, as traced
                         "ratio": {q: _ratio(ph.get("e2e", {}).get(f"{q}_ns"), pa.get("e2e", {}).get(f"{q}_ns"))
                                   for q in ("p50", "p99", "p999")}},
        "sched": {
            "share_of_tail": sched.get("share_of_tail"),
            "share_of_slowest_segments": sched.get("share_of_slowest_segments"),
            "tail_packets": sched.get("slow_packets"), "packets_with_overlap": sched.get("packets_with_overlap"),
            "waiting": top.get("waiting"), "cpu_taken_by": taken_by,
            "runq_waits": sched.get("waits"),
            # per tail packet: the run-queue wait inside it, against what the hog added to the round trip
            "tail_mean_runq_wait_ns": (int(sched["explained_ns"] / sched["slow_packets"])
                                       if sched.get("slow_packets") else None),
            "rtt_p99_added_ns": (rh["p99_ns"] - ra["p99_ns"]) if rh["p99_ns"] and ra["p99_ns"] else None,
        },
        "hog": {"comm": HOG_COMM, "pid": hog.hog_pid}, "vm": {"comm": VM_COMM, "pid": hog.vm_pid},
        "events_lost": {"alone": alone.lost_events, "with_hog": hog.lost_events},
    }
    # Was the machine quiet? Without the hog, a round-trip tail already in the milliseconds, or
    # one that is run-queue wait behind a process of someone else, means the baseline already had
    # a CPU-bound neighbour: the comparison is then not clean (and says so).
    base = (alone.report or {}).get("sched") or {}
    noise_by = (base.get("threads") or [{}])[0].get("cpu_taken_by", "")
    vm_side = bool(pa) and (base.get("share_of_tail") or 0.0) >= MIN_SHARE \
        and (pa.get("tail_threshold_ns") or 0) >= BUSY_TAIL_NS and not noise_by.startswith("vnet-")
    busy = vm_side or (ra["p99_ns"] or 0) >= BUSY_TAIL_NS
    numbers["baseline_noise"] = {"busy": busy, "rtt_p99_ns": ra["p99_ns"],
                                 "vm_waited_behind": noise_by if vm_side else None,
                                 "share_of_tail": base.get("share_of_tail"),
                                 "traced_p99_ns": pa.get("e2e", {}).get("p99_ns")}
    tail_ratio = max((r for r in (ratios["p99"], ratios["p999"]) if r is not None), default=None)
    problems = []
    if tail_ratio is None or tail_ratio < MIN_TAIL_RATIO:
        problems.append(f"the hog did not add a clear tail (p99 x{ratios['p99']}, p99.9 x{ratios['p999']}; "
                        f"expected at least x{MIN_TAIL_RATIO})")
    if not ph:
        problems.append("no request was seen from the client's vNIC to the VM's read")
    elif not ph["tail_largest_segment"].endswith(ph["path"][-1]) or ph["tail_share_vm_read"] < 0.5:
        problems.append(f"the analysis puts the tail in {ph['tail_largest_segment']} "
                        f"({ph['tail_share_vm_read'] * 100:.0f}% in the VM's read), not before the VM's read")
    share = sched.get("share_of_tail") or 0.0
    if share < MIN_SHARE:
        problems.append(f"run-queue waits explain only {share * 100:.0f}% of the tail (expected >= "
                        f"{MIN_SHARE * 100:.0f}%)")
    if not taken_by.startswith(HOG_COMM):
        problems.append(f"the CPU was mostly taken by {taken_by or 'nobody'}, not {HOG_COMM}")
    if busy and problems:
        problems.append(f"the machine was busy: without the hog the round trip's p99 was already {_us(ra['p99_ns'])}"
                        + (f", the VM waiting for its CPU behind {noise_by}, a process outside the demo "
                           f"({(base.get('share_of_tail') or 0) * 100:.0f}% of its traced tail)" if vm_side else
                           f" (the traced requests' p99: {_us(pa.get('e2e', {}).get('p99_ns'))})")
                        + "; run it on a quieter machine")
    ok = not problems
    words = (f"Round trip client -> echo VM -> client, {len(hog.rtt_ns)} requests, 1 per ms: alone p50 "
             f"{_us(ra['p50_ns'])}, p99 {_us(ra['p99_ns'])}, p99.9 {_us(ra['p999_ns'])}; with {HOG_COMM} "
             f"on the VM's CPU p50 {_us(rh['p50_ns'])}, p99 {_us(rh['p99_ns'])}, p99.9 {_us(rh['p999_ns'])} "
             f"(p50 x{ratios['p50']}, p99 x{ratios['p99']}, p99.9 x{ratios['p999']}).")
    if ph:
        words += (f" vnet traced the requests hop by hop, from the client's vNIC to the VM's read: p99 "
                  f"{_us(pa.get('e2e', {}).get('p99_ns'))} alone, {_us(ph['e2e']['p99_ns'])} with the hog;"
                  f" {ph['tail_share_vm_read'] * 100:.0f}% of the time of "
                  f"their p99 tail accrues between {ph['path'][-2]} and the VM's read ({ph['path'][-1]}), "
                  f"{ph['tail_share_network'] * 100:.0f}% on the network before it (its slowest segment's p99 "
                  f"{_us(ph['network_p99_ns'])}, alone {_us(pa.get('network_p99_ns'))}).")
    if sched.get("slow_packets"):
        words += (f" Run-queue waits of the VM's thread explain {share * 100:.0f}% of those tail packets' "
                  f"time; the CPU was mostly held by {taken_by or '?'}.")
    words += (" The added tail is the VM waiting for its CPU behind the CPU-bound neighbour, not the network."
              if ok else " Not the expected answer: " + "; ".join(problems) + ".")
    return numbers, words, ok, "; ".join(problems)


# -- the scenario -----------------------------------------------------------------------------------------


def could_not_run(name: str, error: Exception, files: list, prefix) -> DemoResult:
    """A scenario whose set-up or measurement failed: what it got to, and why."""
    return DemoResult(name, verdict=f"The scenario could not run: {error}", files=files, ok=False,
                      why=f"could not run: {error}", numbers={"params": {"topology_prefix": prefix}})


def finish(ctx: DemoContext, name: str, out: Path, judged: tuple, *, t0: float, timings: dict, params: dict,
           files: list, extra_files: tuple = (), details: dict | None = None) -> DemoResult:
    """A scenario's end: its verdict, numbers, parameters and timings in summary.json, and the result."""
    numbers, verdict, ok, why = judged
    timings["total"] = round(time.monotonic() - t0, 2)
    numbers["params"] = params
    numbers["timings_s"] = timings
    summary = out / "summary.json"
    summary.write_text(json.dumps({"verdict": verdict, "ok": ok, "why": why, "numbers": numbers, **(details or {})},
                                  default=_plain, indent=1) + "\n")
    files += [summary, *extra_files]
    ctx.progress("done", 1.0)
    return DemoResult(name, verdict=verdict, numbers=numbers, files=files, ok=ok, why=why)


def run(ctx: DemoContext) -> DemoResult:
    from vnet.analysis.extras import require
    from vnet.topology import Topology, TopologyError

    require("numpy", "vnet demo tail-latency")  # before minutes are spent: the analysis needs it
    out = Path(ctx.out_dir)
    n = REQUESTS[bool(ctx.quick)]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return DemoResult(NAME, verdict="Needs two CPUs: one shared by the VM and the hog, one for the client.",
                          ok=False, why=f"only CPU {cpus} available")
    shared = _idlest(cpus)
    other = next(c for c in cpus if c != shared)
    runs = [_Run("alone", False, out / "alone.vnt"), _Run("with-hog", True, out / "with-hog.vnt")]
    files: list[Path] = []
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    procs = _Procs()
    prefix = ""
    ctx.progress("topology", 0.02)
    try:
        with Topology() as topo:
            prefix = topo.prefix
            net = _build(topo)
            for i, r in enumerate(runs):
                base = 0.04 + 0.4 * i
                t = time.monotonic()
                _measure(procs, net, r, n, shared, other, snap=r.hog and not ctx.quick,  # bytes for the pcapng
                         step=lambda what, f, r=r, base=base: ctx.progress(f"{r.label}: {what}", base + 0.4 * f))
                timings[r.label] = round(time.monotonic() - t, 2)
                files.append(r.trace)
    except (RuntimeError, TopologyError, OSError, subprocess.SubprocessError) as e:
        return could_not_run(NAME, e, files, prefix)
    finally:
        procs.close()
    from vnet.analysis.plots import plot_all

    t = time.monotonic()
    tables = {}
    for i, r in enumerate(runs):
        ctx.progress(f"{r.label}: analysis", 0.86 + 0.04 * i)
        r.report, tables[r.label] = _analyse(r)
        files += _write_run(r, out, INTERVAL_S)
    timings["analysis"] = round(time.monotonic() - t, 2)
    t = time.monotonic()
    ctx.progress("plots", 0.94)
    for r in runs[1:] if ctx.quick else runs:  # quick: the run that matters
        try:
            files += plot_all(tables[r.label], out / f"plots-{r.label}")  # the requests, as analysed
        except Exception as e:  # matplotlib missing: the numbers stand without the pictures
            if ctx.verbose:
                print(f"vnet demo: no plots for {r.label}: {e}", file=sys.stderr)
    if not ctx.quick:  # the hog run for Wireshark (the packets' first bytes) and ui.perfetto.dev (runq slices)
        from vnet.analysis.export import write_pcapng, write_perfetto

        ctx.progress("pcapng and perfetto exports", 0.97)
        hog_run = runs[1]
        for suffix, write in ((".pcapng", write_pcapng), (".perfetto-trace", write_perfetto)):
            target = out / f"{hog_run.label}{suffix}"
            try:
                write([hog_run.trace], target)
                files.append(target)
            except Exception as e:  # an extra missing (scapy, perfetto): the rest stands
                if ctx.verbose:
                    print(f"vnet demo: no {target.name}: {e}", file=sys.stderr)
    timings["plots_exports"] = round(time.monotonic() - t, 2)
    details = {"vm_waits_by_holder": {r.label: ((r.report or {}).get("sched") or {}).get("threads") for r in runs},
               "analysis_verdict": {r.label: (r.report or {}).get("verdict") for r in runs}}
    return finish(ctx, NAME, out, _judge(*runs), t0=t0, timings=timings, files=files, details=details,
                  params={"requests": n, "interval_s": INTERVAL_S, "shared_cpu": shared, "client_cpu": other,
                          "nice": NICE, "topology_prefix": prefix})
