"""Packet identity across encapsulation: a VXLAN tunnel between two
namespaces; the inner packet has one pkt_id before encapsulation, on the
underlay (encapsulated) and after decapsulation. Real kernel vxlan devices."""

from __future__ import annotations

import time

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
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and len(events) < want:
        events += t.poll(100)
    return events + t.drain()


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
