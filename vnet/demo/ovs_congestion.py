"""`vnet demo ovs-congestion`: network delay in a congested Open vSwitch (issue 9, case A).

Three namespace "VMs" on one Open vSwitch bridge (a private ovsdb-server and
ovs-vswitchd from vnet.ovs, userspace datapath, ovs-vswitchd running in a
"host" namespace that holds the switch-side veth ends)::

    vm1 eth0 ==veth== p1 \\
    vm2 eth0 ==veth== p2 -- br0 (ovs-vswitchd, datapath_type=netdev)   [host]
    vm3 eth0 ==veth== p3 /        p2's egress: tbf 10 Mbit/s, 30 KiB queue

A latency probe (UDP request/response: a client in vm1 sends requests at a
fixed rate to an echo server in vm2) runs twice: alone (the baseline), then
while a bulk flow vm3 -> vm2 keeps the queue of p2's egress full. Both runs
are traced on every hop of the probe's path -- TC ingress/egress of vm1's
vNIC, of the switch ports p1 and p2, of vm2's vNIC, and the kernel's
net:net_dev_start_xmit tracepoint (a packet handed to a device's driver: for
p2, the moment it leaves the queue) -- with the tcpdump filter
``udp and port 7000``: the bulk flow is left out in the kernel, the traces
hold the probe flow only.

Both traces are analysed with `vnet analyze`'s code (requests only). The
congested segment is the one whose median grew the most against the baseline;
it must be p2's queue: TC egress runs before the qdisc, so the segment from
p2's TC egress hook to its transmit is exactly the time in that queue. The
verdict shows that segment's and the end-to-end distribution (p50/p99/max) in
both runs, and what the analysis of the congested run says about its p99 tail.

`run_with(ctx, Settings(datapath_type="system", ...))` runs it on the kernel
datapath (tests/vm, in the 6.1 guest).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from vnet.demo import DemoContext, DemoResult

NAME = "ovs-congestion"
TITLE = "Network delay in a congested Open vSwitch"

PORT = 7000                   # the probe flow (UDP request/response)
BULK_PORT = 9000              # the bulk flow (vm3 -> vm2)
EXPRESSION = f"udp and port {PORT}"
SUBNET = "10.203.0"
XMIT = "net:net_dev_start_xmit"


@dataclass(frozen=True)
class Settings:
    requests: int = 500           # probe requests per run
    rate: float = 200.0           # probe requests per second
    tbf_rate: str = "10mbit"      # p2's egress
    tbf_burst: str = "5kb"
    tbf_limit: str = "30kb"       # queue: 30 KiB at 10 Mbit/s = about 25 ms
    snaplen: int = 128            # packet bytes in each event (for the pcapng)
    fill_timeout: float = 5.0     # seconds for the bulk flow to fill p2's queue
    min_ratio: float = 5.0        # congested p99 of the named segment against the baseline's
    datapath_type: str = "netdev"
    # the bulk flow vm3 -> vm2: "tcp" (one connection; fills the queue by itself) or "udp" (datagrams
    # paced at bulk_load x the tbf rate); None: tcp on the userspace datapath, udp on the kernel one.
    # (The kernel datapath hands the sender's own skbs to p2's queue, still charged to its socket:
    # TCP small queues then keep only ~2 of them there, and the queue never fills.)
    bulk: str | None = None
    bulk_load: float = 1.25
    extra_probes: tuple[str, ...] = ()  # e.g. ovs:* function probes where the kernel has them
    ovs_timeout: float = 30.0
    plots: bool = True

    @classmethod
    def for_context(cls, ctx: DemoContext) -> "Settings":
        return cls(requests=200, rate=100.0) if ctx.quick else cls()


def run(ctx: DemoContext) -> DemoResult:
    return run_with(ctx, Settings.for_context(ctx))


# -- traffic ----------------------------------------------------------------------------------------------


def _socket_in(ns: str, kind: int) -> socket.socket:
    from vnet.topology import in_netns

    with in_netns(ns):
        return socket.socket(socket.AF_INET, kind)


class EchoServer:
    """UDP echo on PORT in a namespace, answered by a thread."""

    def __init__(self, ns: str, ip: str):
        self.sock = _socket_in(ns, socket.SOCK_DGRAM)
        self.sock.bind((ip, PORT))
        self.sock.settimeout(0.1)
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="ovs-demo-echo", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sock.sendto(data, peer)
            self.answered += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def probe(ns: str, dst: str, n: int, rate: float, tag: int, wait_after: float = 0.5) -> dict:
    """n requests at `rate` per second from `ns`; the RTT of each answer, as the client sees it.
    Request i carries (tag, i) and padding: every request is a distinct packet (pkt_id)."""
    import numpy as np

    sock = _socket_in(ns, socket.SOCK_DGRAM)
    sent: dict[int, int] = {}
    rtts: dict[int, int] = {}
    done = threading.Event()

    def receive() -> None:
        while not (done.is_set() and len(rtts) == len(sent)):
            try:
                data = sock.recv(2048)
            except TimeoutError:
                if done.is_set():
                    return
                continue
            except OSError:
                return
            now = time.monotonic_ns()
            t, seq = struct.unpack_from("!II", data)
            if t == tag and seq in sent:
                rtts[seq] = now - sent[seq]

    with sock:
        sock.connect((dst, PORT))
        sock.settimeout(wait_after)
        rx = threading.Thread(target=receive, name="ovs-demo-probe-rx", daemon=True)
        rx.start()
        t0 = time.monotonic()
        try:
            for i in range(n):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sent[i] = time.monotonic_ns()
                sock.send(struct.pack("!II", tag, i) + b"vnet-probe".ljust(24, b"."))
        finally:
            done.set()
            rx.join(timeout=wait_after + 2)
    lat = np.array(sorted(rtts.values()), dtype=np.int64)
    out = {"sent": len(sent), "answered": int(lat.size)}
    if lat.size:
        out.update({"p50_ns": int(np.percentile(lat, 50)), "p99_ns": int(np.percentile(lat, 99)),
                    "max_ns": int(lat.max())})
    return out


class BulkTcp:
    """One TCP connection src -> dst:BULK_PORT sending as fast as it can until close()."""

    def __init__(self, src_ns: str, dst_ns: str, dst: str):
        self.received = 0
        self._stop = threading.Event()
        self._listener = _socket_in(dst_ns, socket.SOCK_STREAM)
        self._threads: list[threading.Thread] = []
        self._client: socket.socket | None = None
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((dst, BULK_PORT))
            self._listener.listen(1)
            self._listener.settimeout(5)
            self._client = _socket_in(src_ns, socket.SOCK_STREAM)
            self._client.settimeout(5)
            self._client.connect((dst, BULK_PORT))
            conn, _ = self._listener.accept()
        except BaseException:
            self.close()
            raise
        self._conn = conn
        self._conn.settimeout(0.2)
        self._client.settimeout(0.2)
        for target, name in ((self._send, "ovs-demo-bulk-tx"), (self._receive, "ovs-demo-bulk-rx")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _send(self) -> None:
        block = bytes(65536)
        while not self._stop.is_set():
            try:
                self._client.send(block)
            except TimeoutError:
                continue
            except OSError:
                return

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._conn.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            self.received += len(data)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        for s in (self._client, getattr(self, "_conn", None), self._listener):
            if s is not None:
                s.close()


class BulkUdp:
    """Datagrams src -> dst:BULK_PORT at a fixed rate (bits/s on the wire) until close();
    a thread in dst drains them."""

    PAYLOAD = 1472  # a 1514-byte frame: what the tbf counts

    def __init__(self, src_ns: str, dst_ns: str, dst: str, bits_per_s: float):
        self.received = 0
        self._stop = threading.Event()
        self._pps = bits_per_s / ((self.PAYLOAD + 42) * 8)
        self._sink = _socket_in(dst_ns, socket.SOCK_DGRAM)
        self._sink.bind((dst, BULK_PORT))
        self._sink.settimeout(0.2)
        self._sock = _socket_in(src_ns, socket.SOCK_DGRAM)
        self._sock.connect((dst, BULK_PORT))
        self._threads = [threading.Thread(target=f, name=n, daemon=True)
                         for f, n in ((self._send, "ovs-demo-bulk-tx"), (self._receive, "ovs-demo-bulk-rx"))]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        block = bytes(self.PAYLOAD)
        step = 1.0 / self._pps
        due = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now < due:
                self._stop.wait(due - now)
                continue
            due = max(due, now - 0.05) + step  # catch up on short stalls, not on long ones
            try:
                self._sock.send(block)
            except OSError:
                pass

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                self.received += len(self._sink.recv(65536))
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self._sock.close()
        self._sink.close()


def bits_per_s(rate: str) -> float:
    """A tc rate such as 10mbit, 500kbit, 1gbit or 2000000bit, in bits per second."""
    units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3, "bit": 1.0}
    for unit, mult in units.items():
        if rate.lower().endswith(unit):
            return float(rate[: -len(unit)]) * mult
    raise ValueError(f"rate {rate!r}: expected e.g. 10mbit")


# -- the qdisc --------------------------------------------------------------------------------------------


def qdisc_stats(topo, ns: str, ifname: str) -> dict:
    """The root qdisc of ifname: kind, backlog and counters (tc -s -j)."""
    out = topo.run(ns, ["tc", "-s", "-j", "qdisc", "show", "dev", ifname, "root"]).stdout
    rows = json.loads(out or "[]")
    q = rows[0] if rows else {}
    return {k: q.get(k) for k in ("kind", "bytes", "packets", "drops", "overlimits", "backlog", "qlen")}


# -- tracing ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recording(interfaces: list[str], probes: list[str], path: Path, snaplen: int):
    """`vnet trace -i ... -p ... -w path --snaplen N 'udp and port PORT'`, in this process:
    attached when the block starts, recorded by a thread, everything detached at its end.
    Yields a dict that gets the trace's counters when the block ends."""
    from vnet.trace import Trace
    from vnet.trace.filters import PacketFilter
    from vnet.trace.recorder import record
    from vnet.trace.selection import select

    plans, unavailable = select(interfaces, probes)
    out: dict = {"skipped": [f"{n}: {why}" for n, why in unavailable]}
    stop = threading.Event()
    failure: list[BaseException] = []
    with Trace(plans, strict=False, packet_filter=PacketFilter(expression=EXPRESSION), snaplen=snaplen) as t:
        out["skipped"] += [f"{n}: {why}" for n, why in t.skipped]
        out["hooks"] = [h.probe for h in t.hooks]

        def recorder() -> None:
            try:
                out["recorded"] = record(t, path, ending=stop.is_set, count=None).events
            except BaseException as e:  # re-raised in the caller's thread
                failure.append(e)

        thread = threading.Thread(target=recorder, name="ovs-demo-recorder", daemon=True)
        thread.start()
        try:
            yield out
        finally:
            stop.set()
            thread.join(timeout=30)
        if failure:
            raise failure[0]
        s = t.stats()
        out.update(received=s.received, lost=s.lost, seen=s.seen, filtered=s.filtered)


# -- analysis ---------------------------------------------------------------------------------------------


def _short(prefix: str) -> Callable[[str], str]:
    return lambda name: name.replace(prefix, "")


def _pick(st: dict) -> dict:
    return {k: st.get(k) for k in ("count", "p50_ns", "p99_ns", "max_ns")}


def analyse(path: Path, request_flow) -> dict:
    """`vnet analyze` of one run, the requests (vm1 -> vm2:PORT) only: its report."""
    from vnet.analysis.report import analyze
    from vnet.analysis.stream import read_table

    table = read_table([path], flow=request_flow)
    report = analyze(table, slowest=5)
    report["_table"] = table
    return report


def request_path(report: dict, first_hop: str, last_hop: str) -> dict | None:
    """The complete request path of a report (vm1's egress ... vm2's ingress), most packets first."""
    for p in report["paths"]:
        if p["hops"][0] == first_hop and p["hops"][-1] == last_hop:
            return p
    return None


def _segment_stats(report: dict, a: str, b: str) -> dict | None:
    return next((_pick(s) for s in report["segments"] if s["from"] == a and s["to"] == b), None)


def _us(ns) -> str:
    if ns is None:
        return "?"
    return f"{ns / 1000:.0f} us" if ns < 10_000_000 else f"{ns / 1e6:.1f} ms"


def _json_default(o):
    try:
        return o.item()
    except AttributeError:
        return str(o)


# -- the scenario -----------------------------------------------------------------------------------------


def run_with(ctx: DemoContext, cfg: Settings) -> DemoResult:
    """The scenario with explicit settings (the guest test runs it on the kernel datapath)."""
    from vnet.analysis.bulk import Flow
    from vnet.ovs import UserspaceSwitch
    from vnet.topology import Topology, warm_up

    started = time.monotonic()
    bulk_kind = cfg.bulk or ("tcp" if cfg.datapath_type == "netdev" else "udp")
    out_dir = Path(ctx.out_dir)
    files: list[Path] = []
    details: dict = {"settings": {**{k: v for k, v in asdict(cfg).items() if k != "plots"}, "bulk": bulk_kind},
                     "expression": EXPRESSION}
    say = ctx.progress
    say("building the topology: 3 namespace VMs, veths to a host namespace", 0.02)
    with Topology() as topo:
        prefix = topo.prefix
        short = _short(prefix)
        host = topo.add_netns("host")
        vms, ports = [], []
        for i in (1, 2, 3):
            vm = topo.add_netns(f"vm{i}")
            port, vif = topo.add_veth_pair(f"p{i}", host, "eth0", vm)
            topo.disable_offloads(port, host)  # the userspace datapath needs TX checksums filled in
            topo.disable_offloads(vif, vm)
            topo.add_address(vif, vm, f"{SUBNET}.{i}/24")
            vms.append(vm)
            ports.append(port)
        vm1, vm2, vm3 = vms
        ip = {vm: f"{SUBNET}.{i}" for i, vm in enumerate(vms, 1)}
        details["topology"] = {"prefix": prefix, "namespaces": list(topo.namespaces)}
        say(f"starting a private Open vSwitch ({cfg.datapath_type} datapath) in {short(host)}", 0.06)
        with UserspaceSwitch(netns=host, log_dir=out_dir / "ovs", datapath_type=cfg.datapath_type,
                             timeout=cfg.ovs_timeout) as sw:
            details["ovs"] = {"pids": sw.pids, "run_dir": str(sw.run_dir), "datapath_type": cfg.datapath_type}
            br = sw.add_bridge("br0")
            for port in ports:
                sw.add_port(br, port)
            for a, b in ((vm1, vm2), (vm3, vm2), (vm2, vm1), (vm2, vm3)):
                warm_up(a, ip[b], timeout=20)  # ARP, MAC learning and the datapath flows, before tracing

            interfaces = [f"{vm1}/eth0", f"{host}/{ports[0]}", f"{host}/{ports[1]}", f"{vm2}/eth0"]
            probes = [XMIT, *cfg.extra_probes]
            first_hop, last_hop = f"{vm1}/eth0:egress", f"{vm2}/eth0:ingress"  # analysis hop names
            queue_from = f"{host}/{ports[1]}:egress"
            requests = Flow(proto=17, src=ipaddress.ip_network(ip[vm1]), dst=ipaddress.ip_network(ip[vm2]),
                            dport=PORT)
            runs: dict[str, dict] = {}
            echo = EchoServer(vm2, ip[vm2])
            try:
                for k, name in enumerate(("baseline", "congested")):
                    base = 0.12 + 0.36 * k
                    bulk = None
                    try:
                        if name == "congested":
                            say(f"rate-limiting {short(host)}/{ports[1]} egress (tbf {cfg.tbf_rate}, "
                                f"queue {cfg.tbf_limit}); bulk {bulk_kind.upper()} vm3 -> vm2 fills it", base)
                            topo.run(host, ["tc", "qdisc", "add", "dev", ports[1], "root", "tbf",
                                            "rate", cfg.tbf_rate, "burst", cfg.tbf_burst, "limit", cfg.tbf_limit])
                            bulk = (BulkTcp(vm3, vm2, ip[vm2]) if bulk_kind == "tcp" else
                                    BulkUdp(vm3, vm2, ip[vm2], bits_per_s(cfg.tbf_rate) * cfg.bulk_load))
                            fill = _wait_full(topo, host, ports[1], cfg.fill_timeout)
                            details["queue_before_probe"] = fill
                        # the probe flow's datapath flows, not an upcall, for the traced requests
                        probe(vm1, ip[vm2], 3, 50.0, tag=100 + k)
                        trace_file = out_dir / f"{name}.vnt"
                        say(f"{name}: {cfg.requests} probe requests at {cfg.rate:g}/s, traced on every hop "
                            f"('{EXPRESSION}')", base + 0.04)
                        bytes_before = bulk.received if bulk else 0
                        t_probe = time.monotonic()
                        with recording(interfaces, probes, trace_file, cfg.snaplen) as rec:
                            rtt = probe(vm1, ip[vm2], cfg.requests, cfg.rate, tag=k)
                        seconds = time.monotonic() - t_probe
                        files.append(trace_file)
                        rec["hooks"] = [short(h) for h in rec.get("hooks", [])]
                        runs[name] = {"rtt": rtt, "trace": dict(rec)}
                        if bulk is not None:
                            runs[name]["bulk_mbit_s"] = round((bulk.received - bytes_before) * 8 / seconds / 1e6, 2)
                            runs[name]["qdisc"] = qdisc_stats(topo, host, ports[1])
                    finally:
                        if bulk is not None:
                            bulk.close()
            finally:
                echo.close()
            say("stopping Open vSwitch", 0.82)
        files += sorted((out_dir / "ovs").glob("*.log"))
    say("topology removed; analysing both traces (vnet analyze)", 0.84)

    reports = {name: analyse(out_dir / f"{name}.vnt", requests) for name in runs}
    for name, report in reports.items():
        table = report.pop("_table")
        path = out_dir / f"{name}.analysis.json"
        path.write_text(json.dumps(report, default=_json_default, indent=1) + "\n")
        files.append(path)
        if cfg.plots:
            say(f"plots of the {name} run", 0.88 if name == "baseline" else 0.92)
            from vnet.analysis.plots import plot_all

            files += plot_all(table, out_dir / f"plots-{name}")
    if cfg.snaplen:
        say("pcapng export of the congested run", 0.96)
        from vnet.analysis.export import write_pcapng

        pcap = out_dir / "congested.pcapng"
        details["pcapng_packets"] = write_pcapng([out_dir / "congested.vnt"], pcap).packets
        files.append(pcap)

    result = _judge(reports, runs, details, short, first_hop, last_hop, queue_from, cfg)
    result.numbers["seconds"] = details["seconds"] = round(time.monotonic() - started, 1)
    path = out_dir / "details.json"  # every number of both runs: segments, trace counters, setup
    path.write_text(json.dumps(details, default=_json_default, indent=1) + "\n")
    result.files = files + [path]
    say("done", 1.0)
    return result


def _wait_full(topo, ns: str, ifname: str, timeout: float) -> dict:
    """Poll p2's qdisc until the bulk flow keeps a backlog in it (or the timeout)."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        q = qdisc_stats(topo, ns, ifname)
        seen.append(q.get("backlog") or 0)
        if (len(seen) >= 3 and min(seen[-3:]) > 0) or time.monotonic() > deadline:
            return q
        time.sleep(0.1)


def _judge(reports: dict, runs: dict, details: dict, short, first_hop: str, last_hop: str, queue_from: str,
           cfg: Settings) -> DemoResult:
    """The verdict: where the congested run's added delay is, against the expected segment. Fills
    `details` (every number of both runs) and returns the key numbers in the result."""
    per_run: dict[str, dict] = {}
    for name, report in reports.items():
        path = request_path(report, first_hop, last_hop)
        segs = {}
        if path:
            for a, b in zip(path["hops"], path["hops"][1:]):
                segs[f"{short(a)} -> {short(b)}"] = _segment_stats(report, a, b)
        per_run[name] = {
            "path": [short(h) for h in path["hops"]] if path else None,
            "packets": path["count"] if path else 0,
            "e2e": _pick(path["e2e"]) if path else None,
            "segments": segs,
            "rtt": runs[name]["rtt"],
            "trace": runs[name]["trace"],
            "vanished": [{**d, "last_hop": short(d["last_hop"]), "next_hop": short(d["next_hop"])}
                         for d in report["drops"]["ended_early"]],
            **{k: runs[name][k] for k in ("bulk_mbit_s", "qdisc") if k in runs[name]},
            "analysis_verdict": short(report["verdict"]),
        }
    details.update(per_run)
    path = request_path(reports["congested"], first_hop, last_hop)
    if path is None or per_run["baseline"]["path"] is None:
        return DemoResult(NAME, "No probe request was seen on its whole path in one of the runs.",
                          {"expression": EXPRESSION}, ok=False, why="no complete request path in a trace")
    base, cong = per_run["baseline"], per_run["congested"]
    # The congested segment: the one whose median grew the most against the baseline (medians: a
    # scheduling hiccup of a few packets does not move them). The analysis' own answer for one run,
    # the segment holding the largest share of its p99 tail, is reported next to it.
    grown = {seg: (st or {}).get("p50_ns", 0) - ((base["segments"].get(seg) or {}).get("p50_ns") or 0)
             for seg, st in cong["segments"].items()}
    named = max(grown, key=grown.get)
    i_queue = path["hops"].index(queue_from) if queue_from in path["hops"] else None
    expected = (f"{short(queue_from)} -> {short(path['hops'][i_queue + 1])}"
                if i_queue is not None and i_queue + 1 < len(path["hops"]) else f"{short(queue_from)} -> ?")
    tail = path["tail"]
    shares = {f"{short(t['from'])} -> {short(t['to'])}": t for t in tail["segments"]}
    big = tail["segments"][tail["largest"]]
    tail_named = f"{short(big['from'])} -> {short(big['to'])}"
    seg_b, seg_c = base["segments"].get(named) or {}, cong["segments"].get(named) or {}
    e2e_b, e2e_c = base["e2e"] or {}, cong["e2e"] or {}
    ratio = (seg_c.get("p99_ns") or 0) / max(seg_b.get("p99_ns") or 1, 1)
    vanished = sum(d["packets"] for d in cong["vanished"])
    rtt = lambda r: {k: r.get(k) for k in ("answered", "p50_ns", "p99_ns", "max_ns")}  # noqa: E731
    numbers = {
        "segment": named,
        "expected_segment": expected,
        "p99_ratio": round(ratio) if ratio >= 10 else round(ratio, 1),
        "share_of_time": round(shares[named]["mean_share"], 3),  # of the requests' time on their path
        "baseline": {"segment": seg_b, "end_to_end": e2e_b, "client_rtt": rtt(base["rtt"])},
        "congested": {"segment": seg_c, "end_to_end": e2e_c, "client_rtt": rtt(cong["rtt"]),
                      "bulk_mbit_s": cong.get("bulk_mbit_s"), "queue_drops": (cong.get("qdisc") or {}).get("drops"),
                      "requests_vanished": vanished},
        "p99_tail": {"segment": tail_named, "share": round(big["tail_share"], 3), "requests": tail["packets"],
                     "share_in_segment": round(shares[named]["tail_share"], 3)},
        "filter": {"expression": EXPRESSION, "left_out": base["trace"].get("filtered", 0) +
                   cong["trace"].get("filtered", 0), "events": base["trace"].get("recorded", 0) +
                   cong["trace"].get("recorded", 0), "lost": base["trace"].get("lost", 0) + cong["trace"].get("lost", 0)},
    }
    details.update(named_segment=named, expected_segment=expected, key_numbers=numbers)
    port = short(queue_from).removesuffix(":egress")
    a, b = named.split(" -> ")
    words = (f"The delay the bulk flow adds to the probe flow accrues between {a} and {b}: "
             f"p50/p99/max {_us(seg_c.get('p50_ns'))} / {_us(seg_c.get('p99_ns'))} / {_us(seg_c.get('max_ns'))} "
             f"congested against {_us(seg_b.get('p50_ns'))} / {_us(seg_b.get('p99_ns'))} / "
             f"{_us(seg_b.get('max_ns'))} alone (p99 x{ratio:.0f}; {shares[named]['mean_share'] * 100:.0f}% of "
             f"the requests' time). ")
    words += ("That segment is the egress queue of the rate-limited port " if named == expected else
              f"Expected: {expected}, the egress queue of the rate-limited port ")
    words += (f"{port} (tbf {cfg.tbf_rate}, {cfg.tbf_limit}; TC egress runs before the qdisc, the transmit "
              f"after it). End to end vm1 -> vm2: {_us(e2e_c.get('p50_ns'))} / {_us(e2e_c.get('p99_ns'))} / "
              f"{_us(e2e_c.get('max_ns'))} against {_us(e2e_b.get('p50_ns'))} / {_us(e2e_b.get('p99_ns'))} / "
              f"{_us(e2e_b.get('max_ns'))}. The analysis finds {big['tail_share'] * 100:.0f}% of the congested "
              f"p99 tail ({tail['packets']} requests) in {tail_named if tail_named != named else 'that segment'}.")
    if vanished:
        top = cong["vanished"][0]
        words += f" {vanished} requests vanished, most after {top['last_hop']}."
    words += (f" Traced with '{EXPRESSION}' only: {numbers['filter']['left_out']} other packets were left out "
              f"in the kernel, {numbers['filter']['lost']} events lost.")
    ok, why = True, ""
    if named != expected:
        ok, why = False, (f"the median grew most in {named}, not in the queue of the rate-limited port "
                          f"({expected})")
    elif ratio < cfg.min_ratio:
        ok, why = False, (f"the queue segment's p99 grew only x{ratio:.1f} (expected >= x{cfg.min_ratio:g}): "
                          f"the bulk flow did not congest the port")
    return DemoResult(NAME, words, numbers, ok=ok, why=why)
