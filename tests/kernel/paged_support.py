"""Packets whose payload is not in the skb's linear part, and the pkt_id of each at every hook.

Shared by tests/kernel/test_identity.py (the host's kernel) and tests/vm/test_identity_guest.py
(Debian's 6.1, with the fentry and kprobe hooks the host lacks).

TCP puts what it sends in page fragments (the skb's linear part holds the headers), and a veth
pair hands the skb to its peer as it is: at the receiver's tracepoints and socket probes the
payload is not where a kernel hook reads (head + offset), nor where the tc hooks' relative loads
reach (bpf_skb_load_bytes_relative stops at the tail pointer too). UDP GSO datagrams cut into
segments after the sender's tc hook give paged UDP datagrams the same way. Offloads stay on
(checksums, scatter-gather, TSO, GSO, GRO), as on a real host.

Nothing is mocked: real namespaces, real eBPF, real packets.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

from vnet.probes import catalog
from vnet.probes import resolve as resolver
from vnet.probes.device import resolve as resolve_device
from vnet.topology import Topology, in_netns, udp_sink, warm_up
from vnet.trace import Trace
from vnet.trace.filters import PacketFilter
from vnet.trace.session import device_plan

TCP_PORT = 7310
UDP_PORT = 7311
UDP_SEGMENT = 103  # linux/udp.h: the socket sends GSO datagrams, cut into segments of this size
TCP_SIZES = [1000, 1460, 2000, 3000, 4000] * 4  # one message, one skb (TSO): 1 to 3 segments' worth
UDP_PLAIN = [64, 200, 900, 1400] * 3
UDP_GSO, UDP_SEG = 6, 1000  # datagrams of 3 segments each


@dataclass(frozen=True)
class Pair:
    topo: Topology
    a: str
    b: str
    if_a: str
    if_b: str
    ip_a: str
    ip_b: str

    @property
    def egress(self) -> str:
        return f"dev:{self.a}/{self.if_a}:egress"

    @property
    def ingress(self) -> str:
        return f"dev:{self.b}/{self.if_b}:ingress"


@contextlib.contextmanager
def offloaded_pair(subnet: int = 97, net: str = "10.199", warm_timeout: float = 3.0):
    """ns a/ifA <-veth-> ns b/ifB, NET.SUBNET.1 and .2, every offload on; ifA cuts UDP GSO
    datagrams in software after its tc egress hook (tx-udp-segmentation off), into paged segments."""
    with Topology() as topo:
        a, b = topo.add_netns("a"), topo.add_netns("b")
        if_a, if_b = topo.add_veth_pair("ifA", a, "ifB", b)
        ip_a, ip_b = f"{net}.{subnet}.1", f"{net}.{subnet}.2"
        for ns, dev, ip in ((a, if_a, ip_a), (b, if_b, ip_b)):
            topo.run(ns, ["ethtool", "-K", dev, "tx", "on", "sg", "on", "tso", "on", "gso", "on", "gro", "on"])
            topo.add_address(dev, ns, f"{ip}/24")
        topo.run(a, ["ethtool", "-K", if_a, "tx-udp-segmentation", "off"])
        warm_up(a, ip_b, timeout=warm_timeout)
        warm_up(b, ip_a, timeout=warm_timeout)
        yield Pair(topo, a, b, if_a, if_b, ip_a, ip_b)


def plans(pair: Pair, probes: list[tuple[str, str | None]], egress: bool = True) -> list:
    """ifB's tc ingress (and ifA's egress), and the catalog probes as (name, hook kind or None)."""
    out = [device_plan(resolve_device(f"{pair.b}/{pair.if_b}"), ("ingress",))]
    if egress:
        out.append(device_plan(resolve_device(f"{pair.a}/{pair.if_a}"), ("egress",)))
    for name, force in probes:
        res = resolver.resolve(catalog.BY_NAME[name], force)
        assert res.available, f"{name}@{force}: {res.why_not}"
        out.append(resolver.plan(res))
    return out


def by_probe(events: list[dict], probe: str) -> list[dict]:
    return [e for e in events if e["probe"] == probe]


# -- TCP ------------------------------------------------------------------------------------------------

def tcp_messages(pair: Pair, trace_plans: list, timeout: float = 10.0) -> list[dict]:
    """TCP_SIZES messages from a to b, 5 ms apart (no two in one GSO or GRO packet), traced."""
    got = [0]
    with in_netns(pair.b):
        listener = socket.socket()
    with listener, Trace(trace_plans, packet_filter=PacketFilter(proto="tcp", dport=TCP_PORT)) as t:
        listener.bind((pair.ip_b, TCP_PORT))
        listener.listen(1)
        listener.settimeout(timeout)

        def serve():
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(timeout)
                while chunk := conn.recv(65536):
                    got[0] += len(chunk)

        server = threading.Thread(target=serve, name="paged-tcp-server", daemon=True)
        server.start()
        with in_netns(pair.a):
            c = socket.socket()
        with c:
            c.settimeout(timeout)
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.connect((pair.ip_b, TCP_PORT))
            for i, size in enumerate(TCP_SIZES):
                c.sendall((b"vnet-paged-%06d" % i).ljust(size, b"."))
                time.sleep(0.005)
        server.join(timeout)
        assert got[0] == sum(TCP_SIZES), f"the receiver read {got[0]} of {sum(TCP_SIZES)} bytes"
        events = t.poll_until(lambda evs: len(by_probe(evs, "sock:datagram_copy")) >= len(TCP_SIZES), timeout)
        return events + t.drain()


def check_tcp(pair: Pair, events: list[dict], kernel_probes: list[str], egress: bool = True) -> None:
    """Every segment at a kernel probe has the pkt_id ifB's tc ingress gave the same headers;
    every data segment (one per message) is there, and reached the application."""
    def key(e):
        return e["tcp_seq"], e["tcp_ack"], e["tcp_flags"], e["ip_id"]

    at_tc = by_probe(events, pair.ingress)
    tc = {key(e): e["pkt_id"] for e in at_tc}
    data = [e for e in at_tc if "P" in e["tcp_flags"]]
    assert len(data) == len(TCP_SIZES), [e["len"] for e in data]
    assert len(tc) == len(at_tc) and len(set(tc.values())) == len(at_tc)
    if egress:
        sent = {e["pkt_id"] for e in by_probe(events, pair.egress) if "P" in e["tcp_flags"]}
        assert sent == {e["pkt_id"] for e in data}
    for probe in kernel_probes:
        evs = by_probe(events, probe)
        seen = {key(e) for e in evs}
        missing = [e for e in data if key(e) not in seen]
        if probe in ("sock:datagram_copy", "sock:tcp_receive"):
            # A receiver that reads late finds segments merged in its queue (tcp_try_coalesce),
            # and a segment that arrives while the reader holds the socket is merged into the
            # backlog's last one (tcp_add_backlog) before TCP receives either (a slow guest
            # makes it happen): the merged skb keeps the first one's headers and its len
            # covers all their payload. Each data segment must still be inside some event's skb.
            missing = [e for e in missing
                       if not any(0 <= (e["tcp_seq"] - c["tcp_seq"]) % (1 << 32) < c["len"] for c in evs)]
        assert not missing, f"{probe}: data segments missing: {[(e['tcp_seq'], e['len']) for e in missing]}"
        wrong = [(e["tcp_seq"], e["len"], e["pkt_id"], tc.get(key(e))) for e in evs if e["pkt_id"] != tc.get(key(e))]
        assert not wrong, f"{probe}: (seq, len, pkt_id, tc's pkt_id) differ: {wrong}"
        assert not any(e.get("pkt_id_partial") or e.get("truncated") for e in evs), probe


# -- UDP ------------------------------------------------------------------------------------------------

def udp_datagrams(pair: Pair, trace_plans: list, timeout: float = 5.0) -> list[dict]:
    """UDP_PLAIN datagrams (linear), then UDP_GSO datagrams of 3 segments (paged), from a to b."""
    def sock():
        with in_netns(pair.a):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((pair.ip_b, UDP_PORT))  # connected: every datagram a new IP ID
        return s

    want = len(UDP_PLAIN) + 3 * UDP_GSO
    with Trace(trace_plans, packet_filter=PacketFilter(proto="udp", dport=UDP_PORT)) as t, \
            udp_sink(pair.b, UDP_PORT) as sink:
        with sock() as s:
            for i, size in enumerate(UDP_PLAIN):
                s.send((b"vnet-plain-%06d" % i).ljust(size, b"."))
        with sock() as s:
            s.setsockopt(socket.IPPROTO_UDP, UDP_SEGMENT, UDP_SEG)
            for i in range(UDP_GSO):  # the first bytes of each segment its own
                s.send(b"".join((b"vnet-gso-%06d-%d" % (i, k)).ljust(UDP_SEG, b".") for k in range(3)))
        assert sink.received(expect=want, timeout=timeout) == want
        events = t.poll_until(lambda evs: len(by_probe(evs, pair.ingress)) >= want, timeout)
        return events + t.drain()


def check_udp(pair: Pair, events: list[dict], receive_probe: str = "net:netif_receive_skb") -> None:
    """Linear datagrams: one pkt_id at tc and at the kernel hooks. Paged segments: tc hashes their
    payload all the same (each its own id, though one datagram's segments share IP IDs with the
    next one's); a kernel hook cannot read it and says so (pkt_id_partial) instead of hashing what
    lies past the linear part: its id is then the headers' alone, the same at every kernel hook."""
    want = len(UDP_PLAIN) + 3 * UDP_GSO
    at_tc = by_probe(events, pair.ingress)
    assert len(at_tc) == want and len({e["pkt_id"] for e in at_tc}) == want  # every datagram and segment its own id
    segments = [e for e in at_tc if e["len"] == 14 + 20 + 8 + UDP_SEG]
    assert len(segments) == 3 * UDP_GSO
    plain_tc = {(e["sport"], e["ip_id"]): e["pkt_id"] for e in at_tc if e not in segments}
    rx = [e for e in by_probe(events, receive_probe) if e.get("netns") in (None, pair.b)]
    assert len(rx) == want, [(e["ip_id"], e["len"]) for e in rx]
    plain_rx = [e for e in rx if (e["sport"], e["ip_id"]) in plain_tc and not e.get("pkt_id_partial")]
    assert len(plain_rx) == len(UDP_PLAIN)
    assert all(e["pkt_id"] == plain_tc[(e["sport"], e["ip_id"])] for e in plain_rx)
    paged = [e for e in rx if e not in plain_rx]
    assert len(paged) == 3 * UDP_GSO and all(e.get("pkt_id_partial") for e in paged), paged
    assert not any(e.get("truncated") for e in rx)
    assert not {e["pkt_id"] for e in paged} & {e["pkt_id"] for e in at_tc}
    # The copy to the application (UDP fires it for non-linear datagrams): the kernel hooks agree.
    rx_ids = {e["pkt_id"] for e in paged}
    copies = by_probe(events, "sock:datagram_copy")
    assert all(e.get("pkt_id_partial") and e["pkt_id"] in rx_ids for e in copies), copies
