"""Linux bridge function probes for real, with both backends: two namespace
"VMs" behind a bridge; every datagram is seen at the bridge's receive and
forward functions with the same pkt_id as at the bridge ports' tc hooks."""

from __future__ import annotations

import pytest

from vm_support import collect, ours

PORT = 7400
COUNT = 15


@pytest.mark.parametrize("force", ["fentry", "kprobe"])
def test_bridge_functions_see_every_frame_with_its_pkt_id(force, guest_modules):
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver
    from vnet.probes.device import resolve as resolve_device
    from vnet.topology import Topology, send_udp, udp_sink, warm_up
    from vnet.trace import Trace
    from vnet.trace.session import device_plan

    with Topology.two_vms_behind_bridge() as net:
        warm_up(net.vm1_ns, net.vm2_ip)
        port_in = f"{net.host_ns}/{net.host_ports[0]}"
        plans = [resolver.plan(resolver.resolve(catalog.BY_NAME[name], force))
                 for name in ("bridge:handle_frame", "bridge:forward")]
        plans.append(device_plan(resolve_device(port_in), ("ingress",)))
        with Trace(plans) as t, udp_sink(net.vm2_ns, PORT) as sink:
            assert {h.kind for h in t.hooks if h.probe.startswith("bridge:")} == {force}
            send_udp(net.vm1_ns, net.vm2_ip, PORT, count=COUNT)
            assert sink.received(expect=COUNT, timeout=10) == COUNT
            events = collect(t, lambda ev: len(ours(ev, "bridge:forward", PORT)) >= COUNT)
    frames = ours(events, "bridge:handle_frame", PORT)
    forwarded = ours(events, "bridge:forward", PORT)
    at_port = ours(events, f"dev:{port_in}:ingress", PORT)
    assert len(at_port) == COUNT and len({e["pkt_id"] for e in at_port}) == COUNT
    # handle_frame takes a struct sk_buff ** (dereferenced by the probe): the ingress port's frames.
    assert {e["pkt_id"] for e in frames} == {e["pkt_id"] for e in at_port}
    assert {(e["ifname"], e["netns"]) for e in frames} == {(net.host_ports[0], net.host_ns)}
    assert {e["pkt_id"] for e in forwarded} == {e["pkt_id"] for e in at_port}
    for pid in {e["pkt_id"] for e in at_port}:  # tc ingress runs before the bridge's rx handler
        t_tc = min(e["ts_ns"] for e in at_port if e["pkt_id"] == pid)
        t_br = min(e["ts_ns"] for e in frames if e["pkt_id"] == pid)
        t_fw = min(e["ts_ns"] for e in forwarded if e["pkt_id"] == pid)
        assert t_tc <= t_br <= t_fw
