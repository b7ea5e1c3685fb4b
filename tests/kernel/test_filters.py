"""The in-kernel filter and consistent sampling: for each criterion, traffic
that matches and traffic that does not, counted exactly; sampled packets keep
every hop. Real namespaces, real packets."""

from __future__ import annotations

import time

import pytest

from kernel_support import veth_pair
from vnet.probes import catalog
from vnet.probes import resolve as resolver
from vnet.probes.device import resolve as resolve_device
from vnet.topology import send_udp, tcp_exchange, udp_sink
from vnet.trace import Trace
from vnet.trace.filters import PacketFilter
from vnet.trace.session import device_plan

pytestmark = pytest.mark.kernel


def run(net, packet_filter: PacketFilter, traffic, expect: int, extra_plans=()) -> tuple[list[dict], object]:
    plans = [device_plan(resolve_device(net.spec1), ("egress",)), *extra_plans]
    with Trace(plans, packet_filter=packet_filter) as t:
        traffic()
        events, deadline = [], time.monotonic() + 3
        while time.monotonic() < deadline:
            events += t.poll(100)
            if len(events) >= expect:
                events += t.poll(200)  # anything beyond the expected would show up now
                break
        stats = t.stats()
    return events, stats


@pytest.fixture(scope="module")
def net():
    with veth_pair(90) as n:
        yield n


def udp(net, port, count, size=10):
    def go():
        with udp_sink(net.ns2, port) as sink:
            send_udp(net.ns1, net.ip2, port, count=count, payload_fn=lambda i: b"x" * size)
            sink.received(expect=count)
    return go


def both(net):
    """7 datagrams to port 6001 and 5 to port 6002, 40-byte and 300-byte payloads."""
    def go():
        udp(net, 6001, 7, 40)()
        udp(net, 6002, 5, 300)()
    return go


@pytest.mark.parametrize("flt, expected", [
    (PacketFilter(dport=6001), 7),
    (PacketFilter(port=6002), 5),
    (PacketFilter(proto="udp", dport=6002), 5),
    (PacketFilter(proto="tcp"), 0),
    (PacketFilter(len_max=14 + 20 + 8 + 40), 7),           # skb->len at tc egress includes Ethernet
    (PacketFilter(len_min=14 + 20 + 8 + 300), 5),
])
def test_port_protocol_and_length_filters_count_exactly(net, flt, expected):
    events, stats = run(net, flt, both(net), expected)
    udp_events = [e for e in events if e["proto"] == "udp" and e["dport"] in (6001, 6002)]
    assert len(udp_events) == expected and len(events) == expected  # nothing else passes either
    assert stats.filtered >= 12 - expected


def test_address_filters(net):
    prefix = net.ip2.rsplit(".", 1)[0] + ".0/24"
    for flt, expected in ((PacketFilter(src=net.ip1, dport=6001), 7), (PacketFilter(dst=net.ip1), 0),
                          (PacketFilter(dst=prefix, port=6002), 5), (PacketFilter(host=net.ip2, dport=6001), 7),
                          (PacketFilter(src="10.123.0.0/16"), 0), (PacketFilter(proto="ip6"), None)):
        events, _ = run(net, flt, both(net), expected or 0)
        got = [e for e in events if e["proto"] == "udp"]
        if expected is None:  # IPv6 only: none of the IPv4 datagrams
            assert got == []
        else:
            assert len(got) == expected, flt


def test_filter_applies_to_tracepoint_probes_too(net):
    plan = resolver.plan(resolver.resolve(catalog.BY_NAME["net:netif_receive_skb"]))
    events, _ = run(net, PacketFilter(dport=6002), both(net), 10, extra_plans=[plan])
    rx = [e for e in events if e["probe"] == "net:netif_receive_skb"]
    assert len(rx) == 5 and {e["dport"] for e in rx} == {6002}


def test_tcp_filter_sees_the_connection(net):
    events, _ = run(net, PacketFilter(proto="tcp", dport=6100),
                    lambda: tcp_exchange(net.ns1, net.ns2, net.ip2, 6100, 5000), 1)
    assert events and all(e["proto"] == "tcp" and e["dport"] == 6100 for e in events)


def test_sampling_keeps_the_same_packets_at_every_hop(net):
    """1/8: every kept packet is seen at both ends, and the kept fraction is
    1/8 within statistical error (binomial, 2000 packets: sd ~ 15)."""
    sent = 2000
    plans = [device_plan(resolve_device(net.spec1), ("egress",)), device_plan(resolve_device(net.spec2), ("ingress",))]
    with Trace(plans, packet_filter=PacketFilter(dport=6200, sample="1/8")) as t:
        with udp_sink(net.ns2, 6200) as sink:
            send_udp(net.ns1, net.ip2, 6200, count=sent)
            sink.received(timeout=5, expect=sent)
        events, deadline = [], time.monotonic() + 3
        while time.monotonic() < deadline:
            events += t.poll(100)
        events += t.drain()
    eg = {e["pkt_id"] for e in events if e["probe"].endswith(":egress")}
    ing = {e["pkt_id"] for e in events if e["probe"].endswith(":ingress")}
    assert eg == ing  # complete paths: the same packets kept at both hooks
    assert all(int(p, 16) % 8 == 0 for p in eg)
    assert abs(len(eg) - sent / 8) < 5 * (sent * (1 / 8) * (7 / 8)) ** 0.5


def test_bad_filters_are_usage_errors():
    from vnet.errors import UsageError

    for bad in (PacketFilter(proto="bogus"), PacketFilter(src="10.0.0.300"), PacketFilter(sport=70000),
                PacketFilter(src="10.0.0.1", dst="fd00::1"), PacketFilter(sample="3/8"),
                PacketFilter(len_min=100, len_max=50)):
        with pytest.raises(UsageError):
            bad.config()


def test_aggregation_agrees_with_per_packet_events(net):
    """The kernel's numbers against the per-packet events of the same packets:
    in check mode the programs keep the numbers and still emit the events they
    come from, so the two must agree exactly (counts, bytes, percentile buckets)."""
    from vnet.analysis.histogram import Log2Histogram, bucket_of

    plans = [device_plan(resolve_device(net.spec1), ("egress",)), device_plan(resolve_device(net.spec2), ("ingress",))]
    sent = 600
    with Trace(plans, packet_filter=PacketFilter(dport=6300), aggregate_and_events=True) as t:
        with udp_sink(net.ns2, 6300) as sink:
            send_udp(net.ns1, net.ip2, 6300, count=sent)
            sink.received(timeout=5, expect=sent)
        events, deadline = [], time.monotonic() + 3
        while time.monotonic() < deadline and len(events) < 2 * sent:
            events += t.poll(100)
        points, hists = t.aggregates()
    egress, ingress = f"dev:{net.spec1}:egress", f"dev:{net.spec2}:ingress"
    assert points[egress].packets == points[ingress].packets == sent
    assert points[egress].bytes == sum(e["len"] for e in events if e["probe"] == egress)
    # every packet enters the path at egress, and is paired at ingress: no hop lost
    assert (points[egress].first, points[ingress].first) == (sent, 0)
    assert points[egress].hist_lost == points[ingress].hist_lost == 0
    hist = hists[(egress, ingress)]
    sent_at = {e["pkt_id"]: e["ts_ns"] for e in events if e["probe"] == egress}
    exact = Log2Histogram()
    for e in events:
        if e["probe"] == ingress:
            b = bucket_of(e["ts_ns"] - sent_at[e["pkt_id"]])
            exact.counts[b] = exact.counts.get(b, 0) + 1
    assert hist.counts == exact.counts and hist.total == sent
    for q in (0.5, 0.9, 0.99):
        assert hist.percentile_bucket(q) == exact.percentile_bucket(q)


def test_aggregation_mode_emits_no_events(net):
    plans = [device_plan(resolve_device(net.spec1), ("egress",)), device_plan(resolve_device(net.spec2), ("ingress",))]
    with Trace(plans, packet_filter=PacketFilter(dport=6301), aggregate=True) as t:
        udp(net, 6301, 50)()
        time.sleep(0.3)
        assert t.poll(50) == []
        points, hists = t.aggregates()
    assert [p.packets for p in points.values()] == [50, 50]
    assert [p.first for p in points.values()] == [50, 0]
    assert sum(h.total for h in hists.values()) == 50


def test_netns_and_interface_filters_on_a_tracepoint(net):
    """netif_receive_skb fires in both namespaces of a veth pair whose ends
    have the same ifindex: the netns and interface filters keep exactly the
    side asked for."""
    plan = lambda: resolver.plan(resolver.resolve(catalog.BY_NAME["net:netif_receive_skb"]))  # noqa: E731
    for flt in (PacketFilter(netns=net.ns2), PacketFilter(netns=net.ns2, ifaces=(net.if2,)),
                PacketFilter(ifaces=(f"{net.ns2}/{net.if2}",))):
        with Trace([plan()], packet_filter=flt) as t:
            send_udp(net.ns1, net.ip2, 6400, count=6)
            send_udp(net.ns2, net.ip1, 6401, count=3)  # the other way: must be left out
            events, deadline = [], time.monotonic() + 2
            while time.monotonic() < deadline and len(events) < 6:
                events += t.poll(100)
            events += t.poll(300)
        assert len([e for e in events if e["proto"] == "udp"]) == 6, flt  # (plus any ARP/ND refresh)
        assert {(e["ifname"], e["netns"]) for e in events} == {(net.if2, net.ns2)}
    with Trace([plan()], packet_filter=PacketFilter(netns=net.ns1, proto="udp")) as t:
        send_udp(net.ns1, net.ip2, 6400, count=5)
        send_udp(net.ns2, net.ip1, 6401, count=4)
        events, deadline = [], time.monotonic() + 2
        while time.monotonic() < deadline and len(events) < 4:
            events += t.poll(100)
    assert len(events) == 4 and {(e["ifname"], e["netns"]) for e in events} == {(net.if1, net.ns1)}


def test_ipv6_prefix_filters(net):
    net.topo.add_address(net.if1, net.ns1, "fd00:90::1/64")
    net.topo.add_address(net.if2, net.ns2, "fd00:90::2/64")
    from vnet.topology import warm_up

    warm_up(net.ns1, "fd00:90::2")

    def traffic():
        with udp_sink(net.ns2, 6500) as sink:
            send_udp(net.ns1, "fd00:90::2", 6500, count=6)
            send_udp(net.ns1, net.ip2, 6500, count=4)
            sink.received(expect=10)

    for flt, expected in ((PacketFilter(dst="fd00:90::/64", dport=6500), 6),
                          (PacketFilter(src="fd00:90::1", dport=6500), 6),
                          (PacketFilter(host="fd00:91::/64"), 0),
                          (PacketFilter(proto="ip6", dport=6500), 6),
                          (PacketFilter(proto="ip", dport=6500), 4)):
        events, _ = run(net, flt, traffic, expected)
        assert len([e for e in events if e["dport"] == 6500]) == expected, flt


@pytest.mark.parametrize("flt", [
    PacketFilter(),                                   # nothing rejects: the clock is read before the parse
    PacketFilter(len_min=20 + 8 + 10),                # a test before the parse (IP length: no Ethernet after tc egress)
    PacketFilter(expression="udp dst port 6400"),    # the expression runs before the record: before the parse
    PacketFilter(dport=6400),                         # the tuple may reject after the parse: read after it
    PacketFilter(sample="1/1", dport=6400),
], ids=["none", "length", "expression", "tuple", "sample"])
def test_event_time_is_taken_while_the_packet_is_at_the_hook(net, flt):
    """Wherever the programs read the clock (before the parse where nothing after
    it may reject, else after the filter), every event's time lies within the
    sending, on the kernel's monotonic clock, and a packet's hops are in order."""
    sent, sending = 20, {}

    def traffic():
        sending["before"] = time.monotonic_ns()
        udp(net, 6400, sent)()
        sending["after"] = time.monotonic_ns()

    events, _ = run(net, flt, traffic, 3 * sent, extra_plans=(
        device_plan(resolve_device(net.spec2), ("ingress",)),
        resolver.plan(resolver.resolve(catalog.BY_NAME["net:netif_receive_skb"]))))
    before, after = sending["before"], sending["after"]
    ours = [e for e in events if e["proto"] == "udp" and e["dport"] == 6400]
    hops = {}
    for e in ours:
        hops.setdefault(e["pkt_id"], {})[e["probe"].split(":")[-1]] = e["ts_ns"]
    assert len(hops) == sent and all(len(h) == 3 for h in hops.values()), hops
    assert all(before <= e["ts_ns"] <= after for e in ours), (before, after, [e["ts_ns"] for e in ours])
    for h in hops.values():
        assert h["egress"] <= h["netif_receive_skb"] <= h["ingress"]  # the tracepoint comes before tc ingress
