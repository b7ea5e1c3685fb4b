"""Packet identity across encapsulation: a VXLAN tunnel between two
namespaces; the inner packet has one pkt_id before encapsulation, on the
underlay (encapsulated) and after decapsulation. Real kernel vxlan devices."""

from __future__ import annotations


import pytest

from vnet.probes.device import resolve as resolve_device
from vnet.topology import Topology, send_udp, udp_sink, warm_up
from vnet.trace import Trace
from vnet.trace.filters import PacketFilter
from vnet.trace.session import device_plan

pytestmark = pytest.mark.kernel
VNI = 42
PORT = 7300


@pytest.fixture(scope="module")
def tunnel():
    """h1/u1 <-underlay veth-> h2/u2, 10.199.95.0/24; vx42 on each, inner 10.199.96.0/24."""
    with Topology() as topo:
        h1, h2 = topo.add_netns("h1"), topo.add_netns("h2")
        u1, u2 = topo.add_veth_pair("u1", h1, "u2", h2)
        for ns, dev, ip, peer in ((h1, u1, "10.199.95.1", "10.199.95.2"), (h2, u2, "10.199.95.2", "10.199.95.1")):
            topo.disable_offloads(dev, ns)
            topo.add_address(dev, ns, f"{ip}/24")
            topo.run(ns, ["ip", "link", "add", "vx42", "type", "vxlan", "id", str(VNI), "local", ip, "remote", peer,
                          "dstport", "4789", "dev", dev])
            topo.run(ns, ["ip", "link", "set", "vx42", "up"])
            topo.disable_offloads("vx42", ns)
        topo.add_address("vx42", h1, "10.199.96.1/24")
        topo.add_address("vx42", h2, "10.199.96.2/24")
        warm_up(h1, "10.199.96.2")
        warm_up(h2, "10.199.96.1")
        yield topo, h1, h2, u1, u2


def collect(t, want, timeout=5.0):
    return t.poll_until(lambda events: len(events) >= want, timeout)


def test_inner_packet_keeps_its_pkt_id_through_vxlan(tunnel):
    topo, h1, h2, u1, u2 = tunnel
    hops = [(f"{h1}/vx42", "egress"), (f"{h1}/{u1}", "egress"), (f"{h2}/{u2}", "ingress"), (f"{h2}/vx42", "ingress")]
    plans = [device_plan(resolve_device(spec), (d,)) for spec, d in hops]
    with Trace(plans, packet_filter=PacketFilter(dport=PORT)) as t, udp_sink(h2, PORT) as sink:
        send_udp(h1, "10.199.96.2", PORT, count=20)
        assert sink.received(expect=20) == 20
        events = collect(t, 80)
    by_probe = {f"dev:{spec}:{d}": [e for e in events if e["probe"] == f"dev:{spec}:{d}"] for spec, d in hops}
    ids = {probe: {e["pkt_id"] for e in evs} for probe, evs in by_probe.items()}
    assert all(len(evs) == 20 for evs in by_probe.values()), {p: len(v) for p, v in by_probe.items()}
    assert len(set(map(frozenset, ids.values()))) == 1 and len(next(iter(ids.values()))) == 20
    # On the underlay the event shows the inner tuple and the VNI; on the vxlan device no VNI.
    under = by_probe[f"dev:{h1}/{u1}:egress"]
    assert {(e["src"], e["dst"], e["dport"], e.get("vni")) for e in under} == {("10.199.96.1", "10.199.96.2", PORT, VNI)}
    assert all("vni" not in e for e in by_probe[f"dev:{h1}/vx42:egress"])
    # The outer frame is longer by the VXLAN overhead (outer IP + UDP + VXLAN + inner Ethernet).
    inner_len = by_probe[f"dev:{h1}/vx42:egress"][0]["len"]
    assert under[0]["len"] == inner_len + 20 + 8 + 8 + 14


# -- a path through a bridge, and the protocols -------------------------------------------------------

from kernel_support import veth_pair  # noqa: E402
from vnet.analysis.paths import paths, retransmissions  # noqa: E402
from vnet.probes import catalog  # noqa: E402
from vnet.probes import resolve as resolver  # noqa: E402
from vnet.topology import ping, tcp_exchange  # noqa: E402


def test_bridge_path_has_one_pkt_id_at_every_hook_in_causal_order():
    """ns1 -> veth -> Linux bridge -> veth -> ns2: the device hooks and the
    host-stack tracepoints, every datagram with one id, hops in causal order."""
    with Topology.two_vms_behind_bridge() as net:
        warm_up(net.vm1_ns, net.vm2_ip)
        hops = [(f"{net.vm1_ns}/{net.vm_if}", "egress"), (f"{net.host_ns}/{net.host_ports[0]}", "ingress"),
                (f"{net.host_ns}/{net.host_ports[1]}", "egress"), (f"{net.vm2_ns}/{net.vm_if}", "ingress")]
        plans = [device_plan(resolve_device(s), (d,)) for s, d in hops]
        plans += [resolver.plan(resolver.resolve(catalog.BY_NAME[n]))
                  for n in ("net:net_dev_queue", "net:netif_receive_skb")]
        with Trace(plans, packet_filter=PacketFilter(dport=PORT)) as t, udp_sink(net.vm2_ns, PORT) as sink:
            send_udp(net.vm1_ns, net.vm2_ip, PORT, count=20)
            assert sink.received(expect=20) == 20
            events = collect(t, 20 * 8)
    by_packet = paths(events)
    assert len(by_packet) == 20
    expected = [f"dev:{net.vm1_ns}/{net.vm_if}:egress", "net:net_dev_queue",
                "net:netif_receive_skb", f"dev:{net.host_ns}/{net.host_ports[0]}:ingress",
                f"dev:{net.host_ns}/{net.host_ports[1]}:egress", "net:net_dev_queue",
                "net:netif_receive_skb", f"dev:{net.vm2_ns}/{net.vm_if}:ingress"]
    for p in by_packet:
        assert sorted(p.hops) == sorted(expected), p.hops
        # Every hop of one packet follows the previous one in time (ordering is by the kernel's clock).
        assert all(b["ts_ns"] >= a["ts_ns"] for a, b in zip(p.events, p.events[1:]))
        devs = [h for h in p.hops if h.startswith("dev:")]
        assert devs == [e for e in expected if e.startswith("dev:")]  # device hooks in path order


def test_ipv6_icmp_and_fragments_keep_their_ids_across_a_veth():
    with veth_pair(91) as net:
        net.topo.add_address(net.if1, net.ns1, "fd00:91::1/64")
        net.topo.add_address(net.if2, net.ns2, "fd00:91::2/64")
        warm_up(net.ns1, "fd00:91::2")
        plans = [device_plan(resolve_device(net.spec1), ("egress",)),
                 device_plan(resolve_device(net.spec2), ("ingress",))]
        with Trace(plans) as t:
            with udp_sink(net.ns2, PORT) as sink:
                send_udp(net.ns1, "fd00:91::2", PORT, count=10)                           # IPv6 UDP
                send_udp(net.ns1, net.ip2, PORT, count=3, payload_fn=lambda i: bytes([i]) * 3000)  # 3 x 3 fragments
                sink.received(expect=13)
            assert ping(net.ns1, net.ip2, count=4) == 4                                   # ICMP echo
            events = collect(t, 2 * (10 + 9 + 8))
    eg = [e for e in events if e["probe"].endswith(":egress")]
    ing = [e for e in events if e["probe"].endswith(":ingress")]
    v6 = [e for e in eg if e.get("ip_version") == 6 and e["dport"] == PORT]
    frags = [e for e in eg if e.get("ip_version") == 4 and e["proto"] == "udp" and e["len"] > 1000
             or e.get("fragment")]
    echo = [e for e in events if e["proto"] == "icmp"]
    assert len(v6) == 10 and len({e["pkt_id"] for e in v6}) == 10
    assert len(frags) == 9 and len({e["pkt_id"] for e in frags}) == 9 and sum(1 for e in frags if e.get("fragment")) == 6
    assert len(echo) == 8 and {e["icmp_type"] for e in echo} == {8}  # requests, at both traced hooks
    assert {e["pkt_id"] for e in eg} == {e["pkt_id"] for e in ing}  # every packet, one id at both ends


def test_tcp_retransmission_is_recognisable():
    """Starve the sender's link for a moment (a tbf qdisc that holds almost
    nothing; tc egress runs before the qdisc, so vnet sees what it then drops):
    the sender retransmits, and vnet shows the same (tuple, seq, length) under a
    new pkt_id."""
    import threading

    with veth_pair(92) as net:
        plans = [device_plan(resolve_device(net.spec1), ("egress",))]
        with Trace(plans, packet_filter=PacketFilter(proto="tcp", dport=PORT)) as t:
            net.topo.run(net.ns1, ["tc", "qdisc", "add", "dev", net.if1, "root", "tbf", "rate", "8kbit",
                                   "burst", "1600", "limit", "1"])
            lift = threading.Timer(0.6, lambda: net.topo.run(net.ns1, ["tc", "qdisc", "del", "dev", net.if1,
                                                                        "root"]))
            lift.start()
            try:
                assert tcp_exchange(net.ns1, net.ns2, net.ip2, PORT, 4000, timeout=15) == 4000
            finally:
                lift.join()
            events = collect(t, 10_000, timeout=1.5)
    again = retransmissions(events)
    assert again, "no retransmission seen"
    for first, second in again:
        assert first["pkt_id"] != second["pkt_id"] and first["tcp_seq"] == second["tcp_seq"]
        assert first["ip_id"] != second["ip_id"]


def test_outer_view_of_vxlan_traffic_when_asked(tunnel):
    """--outer: the underlay packet as it is on the wire (VTEP addresses, port
    4789, its own pkt_id), and filters match the outer tuple."""
    topo, h1, h2, u1, u2 = tunnel
    plans = lambda: [device_plan(resolve_device(f"{h1}/{u1}"), ("egress",))]  # noqa: E731
    with Trace(plans(), packet_filter=PacketFilter(outer=True, dport=4789)) as t, udp_sink(h2, PORT) as sink:
        send_udp(h1, "10.199.96.2", PORT, count=10)
        assert sink.received(expect=10) == 10
        outer = collect(t, 10)
    with Trace(plans(), packet_filter=PacketFilter(dport=PORT)) as t, udp_sink(h2, PORT) as sink:
        send_udp(h1, "10.199.96.2", PORT, count=10)
        assert sink.received(expect=10) == 10
        inner = collect(t, 10)
    assert len(outer) == 10 and {(e["src"], e["dst"], e["dport"]) for e in outer} == {("10.199.95.1", "10.199.95.2",
                                                                                       4789)}
    assert all("vni" not in e for e in outer)
    assert len(inner) == 10 and {e["dst"] for e in inner} == {"10.199.96.2"} and {e["vni"] for e in inner} == {VNI}



# -- packets whose payload is not in the skb's linear part (paged_support.py) ------------------------------

import paged_support as paged  # noqa: E402


@pytest.fixture(scope="module")
def offloaded():
    with paged.offloaded_pair() as pair:
        yield pair


def test_tcp_segments_keep_their_pkt_id_at_kernel_hooks_when_the_payload_is_paged(offloaded):
    """1-4 KB TCP messages (one GSO skb each, payload in page fragments): the tc hooks, the
    receive tracepoint, the socket's receive and the copy to the application give every
    segment one pkt_id."""
    probes = ["net:netif_receive_skb", "sock:tcp_receive", "sock:datagram_copy"]
    events = paged.tcp_messages(offloaded, paged.plans(offloaded, [(p, None) for p in probes]))
    paged.check_tcp(offloaded, events, probes)


def test_udp_pkt_id_at_kernel_hooks_matches_tc_or_says_it_cannot(offloaded):
    """Linear datagrams: one pkt_id everywhere. Paged ones (GSO segments): tc hashes their payload
    (bpf_skb_load_bytes), a kernel hook cannot and flags its event pkt_id_partial."""
    probes = [("net:netif_receive_skb", None), ("sock:datagram_copy", None)]
    events = paged.udp_datagrams(offloaded, paged.plans(offloaded, probes, egress=False))
    paged.check_udp(offloaded, events)


# -- how far a kernel hook reads ----------------------------------------------------------------------

import socket  # noqa: E402
import struct  # noqa: E402

from vnet.topology import in_netns  # noqa: E402

DEEP_PORT = 7302


def _ipv6_udp_behind_options(opts_len: int, i: int) -> bytes:
    """An Ethernet frame: IPv6, a Destination Options header of `opts_len` bytes (a multiple
    of 8, PadN options filling it), UDP to DEEP_PORT."""
    payload = b"vnet-deep-%04d" % i
    udp = struct.pack("!HHHH", 40000 + i, DEEP_PORT, 8 + len(payload), 0) + payload
    opts, room = struct.pack("!BB", 17, opts_len // 8 - 1), opts_len - 2
    while room:  # PadN options (type 1), at most 255 bytes of padding each
        n = min(room, 257) if room != 258 else 200
        opts += struct.pack("!BB", 1, n - 2) + bytes(n - 2)
        room -= n
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(opts) + len(udp), 60, 64,
                      socket.inet_pton(socket.AF_INET6, "fd00:93::1"), socket.inet_pton(socket.AF_INET6, "fd00:93::2"))
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x86\xdd" + ip6 + opts + udp


@pytest.mark.parametrize("way", [{"parse_copy": True, "parse_direct": True}, {"parse_copy": True, "parse_direct": False},
                                 {"parse_copy": False}], ids=["in-place", "copy", "header-reads"])
def test_a_kernel_hook_reads_headers_deep_in_the_linear_part(way):
    """UDP behind an 8-byte and behind a 264-byte IPv6 Destination Options header (the UDP
    header 304 bytes past the IP header): tc and net:netif_receive_skb read the same ports and
    give one pkt_id for every datagram, every way the kernel hook reads (parse_cfg): its window
    on the first 256 bytes (in place or copied) does not reach the second kind's UDP header,
    read past it."""
    with veth_pair(93) as net:
        with in_netns(net.ns1):
            tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        with tx:
            tx.bind((net.if1, 0))
            plans = [device_plan(resolve_device(net.spec2), ("ingress",)),
                     resolver.plan(resolver.resolve(catalog.BY_NAME["net:netif_receive_skb"]))]
            # src: only the test's datagrams (the new interfaces' own IPv6 traffic, MLD and ND
            # from their link-local addresses, may cross the pair at the same time)
            flt = PacketFilter(netns=net.ns2, ifaces=(net.if2,), proto="ip6", src="fd00:93::1")
            with Trace(plans, packet_filter=flt, **way) as t:
                for i in range(5):
                    tx.send(_ipv6_udp_behind_options(8, i))
                    tx.send(_ipv6_udp_behind_options(264, 100 + i))
                events = collect(t, 20)
    tc = {e["sport"]: e for e in events if e["probe"].startswith("dev:")}
    tp = {e["sport"]: e for e in events if e["probe"] == "net:netif_receive_skb"}
    sports = sorted([40000 + i for i in range(5)] + [40100 + i for i in range(5)])
    assert sorted(tc) == sports and sorted(tp) == sports
    for sport, e in tp.items():
        assert e["dport"] == DEEP_PORT and not e.get("pkt_id_partial") and not e.get("truncated")
        assert e["pkt_id"] == tc[sport]["pkt_id"]
