#!/usr/bin/env python3
"""Record the fixtures of the golden tests: small real traces, and what vnet makes of them.

    sudo .venv/bin/python tools/record_fixtures.py                 # record every trace, then the golden outputs
    sudo .venv/bin/python tools/record_fixtures.py --only drops    # re-record one (and all golden outputs)
    .venv/bin/python tools/record_fixtures.py --golden-only        # no root: outputs of the committed traces

Recording builds throwaway topologies (vnet.topology.Topology: namespaces, veth
pairs, a bridge; all removed again), runs the real CLI (`python -m vnet trace -w`,
or agents + collector + `vnet dispatch` for two hosts) while sending a fixed
number of packets to fixed ports, and writes the traces to tests/fixtures/traces/.
What was sent, and the names of the hops it must cross, goes to
tests/fixtures/fixtures.json: the checks in tests/unit/test_golden.py read it
(the namespace names carry a random prefix per recording).

The golden outputs (tests/fixtures/golden/FIXTURE.*) are what the current code
prints for those traces: `vnet analyze --json` (also with `--slowest 3`), the
text report (also with `--slowest 3`) and `vnet export --to jsonl`. Regenerate
them with --golden-only when the analysis output changes on purpose, and review
the diff: it is the change users will see.

Timestamps differ per recording, which is why a trace and its golden outputs are
committed together: re-recording changes both.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TRACES = FIXTURES / "traces"
GOLDEN = FIXTURES / "golden"
MANIFEST = FIXTURES / "fixtures.json"
MAX_TRACE_BYTES = 200_000

# (golden file suffix, vnet subcommand and options after the files, kind: json or text)
GOLDEN_RUNS = (
    ("analyze.json", ("analyze", "--json"), "json"),
    ("analyze-slowest3.json", ("analyze", "--json", "--slowest", "3"), "json"),
    ("analyze.txt", ("analyze",), "text"),
    ("analyze-slowest3.txt", ("analyze", "--slowest", "3"), "text"),
    ("export.jsonl", ("export", "--to", "jsonl", "-o", "-"), "jsonl"),
)


def golden_path(fixture: str, suffix: str) -> Path:
    return GOLDEN / f"{fixture}.{suffix}"


def vnet_argv(command: tuple[str, ...], files: list[str]) -> list[str]:
    """`python -m vnet SUBCOMMAND FILES... OPTIONS`; files relative to the repository root
    (the JSON report names them as given, so the golden outputs do not depend on where
    the checkout is)."""
    return [sys.executable, "-m", "vnet", command[0], *files, *command[1:]]


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


# -- golden outputs -----------------------------------------------------------------------------------


def run_vnet(command: tuple[str, ...], files: list[str]) -> str:
    proc = subprocess.run(vnet_argv(command, files), cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"vnet {' '.join(command)} {' '.join(files)} exited {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


def write_golden(manifest: dict, only: list[str] | None = None) -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for name, fixture in sorted(manifest.items()):
        if only and name not in only:
            continue
        for suffix, command, kind in GOLDEN_RUNS:
            out = run_vnet(command, fixture["files"])
            if kind == "json":  # one line from the CLI; indented here, for readable diffs
                out = json.dumps(json.loads(out), indent=1) + "\n"
            golden_path(name, suffix).write_text(out)
            print(f"golden: {golden_path(name, suffix).relative_to(ROOT)} ({len(out):,} bytes)", file=sys.stderr)


# -- processes ----------------------------------------------------------------------------------------


class Proc:
    """A process we started, its stdout and stderr collected line by line by threads."""

    def __init__(self, argv: list[str], **kw):
        self.argv = argv
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT, start_new_session=True, **kw)
        self._threads = [threading.Thread(target=self._read, args=(s, sink), daemon=True)
                         for s, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._threads:
            t.start()

    @classmethod
    def vnet(cls, *args: str, netns: str | None = None) -> "Proc":
        pre = ["ip", "netns", "exec", netns] if netns else []
        return cls([*pre, sys.executable, "-m", "vnet", *args])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, stream, sink: list[str]) -> None:
        for line in stream:
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, text: str, timeout: float = 30.0, stream: str = "err") -> str:
        sink = self.err if stream == "err" else self.out
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                line = next((ln for ln in sink if text in ln), None)
                if line is not None:
                    return line
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    break
                self._cond.wait(min(left, 0.2))
        raise RuntimeError(f"no {text!r} from {' '.join(self.argv)} (exit {self.proc.poll()}):\n"
                           + "\n".join(self.err))

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise RuntimeError(f"{' '.join(self.argv)} still running after {timeout} s:\n" + "\n".join(self.err))
        for t in self._threads:
            t.join(5)
        return rc

    def check(self, timeout: float) -> None:
        rc = self.wait(timeout)
        if rc != 0:
            raise RuntimeError(f"{' '.join(self.argv)} exited {rc}:\n" + "\n".join(self.err))

    def close(self) -> None:
        """SIGTERM (a vnet process detaches and writes its summary), then SIGKILL: this process only."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for t in self._threads:
            t.join(5)


def trace_argv(ifaces: list[str], out: Path, expression: str, *extra: str, duration: float = 2.5) -> list[str]:
    argv = ["trace"]
    for i in ifaces:
        argv += ["-i", i]
    return [*argv, *extra, "--duration", str(duration), "-w", str(out), expression]


def _events_written(p: Proc) -> int:
    line = next((ln for ln in p.err if " events written to " in ln), "")
    return int(line.split()[1]) if line else -1


# -- the recordings -----------------------------------------------------------------------------------
# Each writes its trace files into `tmp` and returns (file names relative to tmp, facts).


def record_veth_path(tmp: Path) -> tuple[list[str], dict]:
    """UDP from vm1 to vm2 through a Linux bridge, every device hook traced, plus a few pings."""
    from vnet.topology import Topology, ping, send_udp, udp_sink, warm_up

    port, sport, udp, pings = 5300, 5301, 30, 3
    out = tmp / "veth-path.vnt"
    with Topology.two_vms_behind_bridge() as net:
        warm_up(net.vm1_ns, net.vm2_ip)
        warm_up(net.vm2_ns, net.vm1_ip)  # neighbour entries both ways: no ARP among the traced packets
        devices = [f"{net.vm1_ns}/{net.vm_if}", f"{net.host_ns}/{net.host_ports[0]}",
                   f"{net.host_ns}/{net.host_ports[1]}", f"{net.vm2_ns}/{net.vm_if}"]
        rec = Proc.vnet(*trace_argv(devices, out, f"(udp and dst port {port}) or icmp"))
        try:
            rec.wait_line("vnet: tracing ")
            with udp_sink(net.vm2_ns, port) as sink:
                send_udp(net.vm1_ns, net.vm2_ip, port, count=udp, sport=sport)
                if sink.received(expect=udp, timeout=5) != udp:
                    raise RuntimeError("vm2 did not receive every datagram")
            if ping(net.vm1_ns, net.vm2_ip, count=pings, interval=0.05) != pings:
                raise RuntimeError("vm2 did not answer every ping")
            rec.check(30)
        finally:
            rec.close()
    forward = [f"{devices[0]}:egress", f"{devices[1]}:ingress", f"{devices[2]}:egress", f"{devices[3]}:ingress"]
    backward = [f"{devices[3]}:egress", f"{devices[2]}:ingress", f"{devices[1]}:egress", f"{devices[0]}:ingress"]
    facts = {
        "topology": "vm1/eth0 --veth-- host/tap1 -[bridge br0]- host/tap2 --veth-- vm2/eth0",
        "udp": {"src": net.vm1_ip, "dst": net.vm2_ip, "sport": sport, "dport": port, "sent": udp, "delivered": udp},
        "icmp_echo": {"sent": pings, "replies": pings},
        "forward_hops": forward, "backward_hops": backward,
        "events_written": _events_written(rec),
    }
    return [out.name], facts


def record_drops(tmp: Path) -> tuple[list[str], dict]:
    """The veth-path topology with two ways to die: datagrams larger than tap2's MTU,
    dropped by the bridge before tap2's egress hook, and datagrams to a port nobody
    listens on in vm2 (NO_SOCKET); drop:kfree_skb traced for the kernel's reasons."""
    from vnet.topology import Topology, send_udp, udp_sink, warm_up

    port, closed, sport = 5310, 5312, 5311
    small, big, to_closed, mtu, big_payload = 20, 10, 5, 1000, 1200
    out = tmp / "drops.vnt"
    with Topology.two_vms_behind_bridge() as net:
        warm_up(net.vm1_ns, net.vm2_ip)
        warm_up(net.vm2_ns, net.vm1_ip)
        net.topology.run(net.host_ns, ["ip", "link", "set", "dev", net.host_ports[1], "mtu", str(mtu)])
        devices = [f"{net.vm1_ns}/{net.vm_if}", f"{net.host_ns}/{net.host_ports[0]}",
                   f"{net.host_ns}/{net.host_ports[1]}", f"{net.vm2_ns}/{net.vm_if}"]
        rec = Proc.vnet(*trace_argv(devices, out, f"udp and dst portrange {port}-{closed}", "-p", "drop:kfree_skb"))
        try:
            rec.wait_line("vnet: tracing ")
            with udp_sink(net.vm2_ns, port) as sink:
                send_udp(net.vm1_ns, net.vm2_ip, port, count=small, sport=sport)
                send_udp(net.vm1_ns, net.vm2_ip, port, count=big, sport=sport,
                         payload_fn=lambda i: (b"vnet-big-%06d" % i).ljust(big_payload, b"x"))
                send_udp(net.vm1_ns, net.vm2_ip, closed, count=to_closed, sport=sport)
                got = sink.received(expect=small, timeout=5)
                time.sleep(0.2)
                if sink.received(timeout=0) != small or got != small:
                    raise RuntimeError(f"vm2 received {sink.received(timeout=0)} datagrams, expected {small}")
            rec.check(30)
        finally:
            rec.close()
    facts = {
        "topology": f"as veth-path; host/tap2 has MTU {mtu}",
        "delivered": {"dport": port, "sent": small, "payload": 10},
        "too_big": {"dport": port, "sent": big, "payload": big_payload,
                    "dropped_after": f"{devices[1]}:ingress", "next": f"{devices[2]}:egress"},
        "closed_port": {"dport": closed, "sent": to_closed, "dropped_after": f"{devices[3]}:ingress",
                        "reason": "NO_SOCKET"},
        "sport": sport,
        "forward_hops": [f"{devices[0]}:egress", f"{devices[1]}:ingress", f"{devices[2]}:egress",
                         f"{devices[3]}:ingress"],
        "events_written": _events_written(rec),
    }
    return [out.name], facts


def record_two_hosts(tmp: Path) -> tuple[list[str], dict]:
    """Two "hosts" (network namespaces joined by a veth pair), each with its own
    `vnet agent`; a collector and `vnet dispatch` of one spec: hostA traces the
    sender's NIC, hostB the receiver's NIC and its receive tracepoint. The
    collector measures each agent's clock: the files carry "clock" chunks."""
    from vnet.protocol import new_key
    from vnet.topology import Topology, send_udp, udp_sink, warm_up

    port, sport, sent = 5320, 5321, 30
    work = tmp / "work"
    work.mkdir()
    key = new_key(work / "key")
    name = "two-hosts"
    with Topology() as topo:
        ns_a, ns_b = topo.add_netns("hostA"), topo.add_netns("hostB")
        if_a, if_b = topo.add_veth_pair("eth0", ns_a, "eth0", ns_b)
        for ifname, ns in ((if_a, ns_a), (if_b, ns_b)):
            topo.disable_offloads(ifname, ns)
        ip_a, ip_b = "10.199.20.1", "10.199.20.2"
        topo.add_address(if_a, ns_a, f"{ip_a}/24")
        topo.add_address(if_b, ns_b, f"{ip_b}/24")
        warm_up(ns_a, ip_b)
        warm_up(ns_b, ip_a)
        procs: list[Proc] = []
        try:
            col_sock = work / "collector.sock"
            col = Proc.vnet("collect", "--listen", f"unix:{col_sock}", "--key", str(key), "--out", str(work / "out"))
            procs.append(col)
            col.wait_line("collector listening on")
            socks = {}
            for host, ns in (("hostA", ns_a), ("hostB", ns_b)):
                socks[host] = work / f"{host}.sock"
                agent = Proc.vnet("agent", "--listen", f"unix:{socks[host]}", "--key", str(key),
                                  "--spool", str(work / f"spool-{host}"), "--host", host, netns=ns)
                procs.append(agent)
                agent.wait_line("agent listening on")
            spec = work / "spec.toml"
            spec.write_text(f"""
[trace]
name = "{name}"
duration = 4
record = "events"

[collector]
address = "unix:{col_sock}"
key = "{key}"

[filter]
expression = "udp and dst port {port}"

[[host]]
name = "hostA"
agent = "unix:{socks['hostA']}"
interfaces = ["{if_a}"]

[[host]]
name = "hostB"
agent = "unix:{socks['hostB']}"
interfaces = ["{if_b}"]
probes = ["net:netif_receive_skb"]
""")
            d = Proc.vnet("dispatch", str(spec), "--json", "-q")
            procs.append(d)
            d.wait_line("hostB: tracing", timeout=60)
            d.wait_line("hostA: tracing", timeout=10)
            with udp_sink(ns_b, port) as sink:
                send_udp(ns_a, ip_b, port, count=sent, sport=sport)
                if sink.received(expect=sent, timeout=5) != sent:
                    raise RuntimeError("hostB did not receive every datagram")
            d.check(90)
            summary = json.loads(d.out[-1])
            if any(summary["losses"].values()):
                raise RuntimeError(f"events lost: {summary['losses']}")
        finally:
            for p in reversed(procs):
                p.close()
    dest = tmp / name
    dest.mkdir()
    files = []
    for host in ("hostA", "hostB"):
        found = sorted((work / "out" / name).glob(f"{host}.vnt*"))
        if [p.name for p in found] != [f"{host}.vnt"]:
            raise RuntimeError(f"expected one file of {host}, the collector wrote {found}")
        shutil.copy(found[0], dest / found[0].name)
        files.append(f"{name}/{found[0].name}")
    facts = {
        "topology": "hostA netns eth0 --veth-- eth0 hostB netns; an agent in each, collector and dispatcher outside",
        "udp": {"src": ip_a, "dst": ip_b, "sport": sport, "dport": port, "sent": sent, "delivered": sent},
        # as the analysis names them: an agent traces `eth0` of its own namespace; the tracepoint
        # names the device from the kernel's (netns, ifindex); "[host] " when there are several hosts
        "hops": [f"[hostA] {if_a}:egress", f"[hostB] net:netif_receive_skb {ns_b}/{if_b}", f"[hostB] {if_b}:ingress"],
        "hosts": ["hostA", "hostB"],
    }
    return files, facts


RECEIVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
n = 0
while True:
    b = c.recv(65536)
    if not b:
        break
    n += len(b)
print(n, flush=True)
"""
HOG = "import sys, time\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end: pass\n"


def record_sched_runq(tmp: Path) -> tuple[list[str], dict]:
    """TCP messages to a receiver process that shares CPU 0 with a CPU hog; the
    receiver's run-queue waits (sched:runq --pid) and the copy of each message to it
    (sock:datagram_copy) are traced along with both NICs. Only data segments (PSH)
    are traced, so every traced packet should reach the socket."""
    from vnet.topology import in_netns, veth_pair

    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        raise RuntimeError("sched-runq needs CPUs 0 and 1")
    port, sport, messages, size, gap = 5330, 5331, 20, 100, 0.02
    out = tmp / "sched-runq.vnt"
    with veth_pair(30) as pair:  # ns a ifA <-veth-> ifB ns b, offloads off, 10.199.30.1/.2, ARP done
        ns1, ns2, if1, if2, ip1, ip2 = pair.ns1, pair.ns2, pair.if1, pair.if2, pair.ip1, pair.ip2
        recv = Proc(["ip", "netns", "exec", ns2, "taskset", "-c", "0", sys.executable, "-c", RECEIVER, ip2, str(port)])
        hog = Proc(["taskset", "-c", "0", sys.executable, "-c", HOG, "20"])
        rec = None
        try:
            recv.wait_line("ready", stream="out")
            expression = f"tcp and dst port {port} and tcp[tcpflags] & tcp-push != 0"
            rec = Proc.vnet(*trace_argv([f"{ns1}/{if1}", f"{ns2}/{if2}"], out, expression, "-p", "sock:datagram_copy",
                                        "-p", "sched:runq", "--pid", str(recv.pid), duration=3))
            rec.wait_line("vnet: tracing ")
            old = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {1})  # this thread sends from CPU 1; the receiver waits on CPU 0
            try:
                with in_netns(ns1):
                    c = socket.socket()
                with c:
                    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    c.bind((ip1, sport))
                    c.connect((ip2, port))
                    for i in range(messages):
                        c.sendall((b"vnet-sched-%06d" % i).ljust(size, b"."))
                        time.sleep(gap)
            finally:
                os.sched_setaffinity(0, old)
            got = recv.wait(10)
            if got != 0 or recv.out[-1] != str(messages * size):
                raise RuntimeError(f"the receiver got {recv.out[-1:]} bytes (exit {got})")
            rec.check(30)
        finally:
            for p in (rec, hog, recv):
                if p is not None:
                    p.close()
    facts = {
        "topology": "ns a ifA --veth-- ifB ns b; receiver and CPU hog pinned to CPU 0, sender on CPU 1",
        "tcp": {"src": ip1, "dst": ip2, "sport": sport, "dport": port, "messages": messages, "size": size,
                "gap_s": gap},
        "receiver_pid": recv.pid, "hog_pid": hog.pid,
        "hops": [f"{ns1}/{if1}:egress", f"{ns2}/{if2}:ingress", "sock:datagram_copy"],
        "events_written": _events_written(rec),
    }
    return [out.name], facts


RECORDERS = {
    "veth-path": record_veth_path,
    "drops": record_drops,
    "two-hosts": record_two_hosts,
    "sched-runq": record_sched_runq,
}


def record(names: list[str]) -> dict:
    from vnet import __version__

    manifest = load_manifest()
    TRACES.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"recording {name} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix=f"vnet-fixture-{name}-") as tmpdir:
            tmp = Path(tmpdir)
            files, facts = RECORDERS[name](tmp)
            for f in files:
                size = (tmp / f).stat().st_size
                if size > MAX_TRACE_BYTES:
                    raise RuntimeError(f"{name}: {f} is {size:,} bytes, over {MAX_TRACE_BYTES:,}")
            old = manifest.get(name, {}).get("files", [])
            for f in old:  # the previous recording's files
                (ROOT / f).unlink(missing_ok=True)
            rel = []
            for f in files:
                dest = TRACES / f
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tmp / f, dest)
                rel.append(str(dest.relative_to(ROOT)))
                print(f"trace: {rel[-1]} ({dest.stat().st_size:,} bytes)", file=sys.stderr)
        manifest[name] = {
            "description": " ".join((RECORDERS[name].__doc__ or "").split()),
            "files": rel,
            "recorded": {"kernel": os.uname().release, "vnet": __version__,
                         "date": datetime.date.today().isoformat(), "tool": "tools/record_fixtures.py"},
            "facts": facts,
        }
        MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--golden-only", action="store_true",
                    help="only regenerate the golden outputs of the committed traces (no root needed)")
    ap.add_argument("--only", action="append", choices=sorted(RECORDERS), metavar="FIXTURE",
                    help=f"only this fixture ({', '.join(RECORDERS)}); repeatable")
    args = ap.parse_args()
    if args.golden_only:
        manifest = load_manifest()
        if not manifest:
            raise SystemExit(f"no {MANIFEST.relative_to(ROOT)}: record the fixtures first (as root)")
        write_golden(manifest, args.only)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("recording needs root (namespaces, eBPF); --golden-only does not")
    manifest = record(args.only or list(RECORDERS))
    write_golden(manifest)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
