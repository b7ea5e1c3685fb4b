"""Snap-length capture on Debian 12's 6.1 kernel: with `snaplen` set, every packet
program (tc, tp_btf, raw_tp, tracepoint, fentry, kprobe, kfree_skb) passes Linux
6.1's verifier, alone and with a tcpdump expression spliced in, and real packets
arrive with their first bytes at TC, fentry and kprobe hooks."""

from __future__ import annotations

import ipaddress

import pytest

from vm_support import collect, load_plan, ours, veth_pair

PORT = 7321
SNAP = 128
CASES = [("net:netif_receive_skb", "tp_btf"), ("net:netif_receive_skb", "raw_tp"),
         ("net:netif_receive_skb", "tracepoint"), ("veth:xmit", "fentry"), ("veth:xmit", "kprobe"),
         ("drop:kfree_skb", "tp_btf"), ("drop:kfree_skb", "raw_tp")]


@pytest.mark.parametrize("probe,force", CASES, ids=[f"{p}@{f}" for p, f in CASES])
@pytest.mark.parametrize("snaplen", [1, 64, 256])
def test_kernel_skb_programs_with_snaplen_load_on_6_1(probe, force, snaplen, guest_modules):
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver

    res = resolver.resolve(catalog.BY_NAME[probe], force)
    assert res.available, f"{probe}@{force}: {res.why_not}"
    plan = resolver.plan(res)
    plan.config = {**plan.config, "snaplen": snaplen}
    o = load_plan(plan)
    try:
        assert all(o.programs[name].fd >= 0 for name in plan.programs)
    finally:
        o.close()


@pytest.mark.parametrize("l3", [0, 1])
@pytest.mark.parametrize("snaplen", [1, 17, 256])
def test_tc_programs_with_snaplen_load_on_6_1(snaplen, l3):
    from vnet.binding import BpfObject
    from vnet.objects import object_path

    o = BpfObject(object_path("tc_trace"))
    try:
        o.set_config("tc_cfg", {"probe_id": 0, "wakeup_every": 1, "snaplen": snaplen, "l3": l3})
        o.load()
        assert all(p.fd >= 0 for p in o.programs.values())
    finally:
        o.close()


@pytest.mark.parametrize("force", ["fentry", "kprobe"])
def test_real_packets_carry_their_bytes_at_every_hook_kind(force, guest_modules):
    """TC egress, veth:xmit (fentry or kprobe) and netif_receive_skb (tp_btf), with a
    tcpdump expression spliced in as well: the same first SNAP bytes everywhere."""
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver
    from vnet.probes.device import resolve as resolve_device
    from vnet.topology import send_udp, udp_sink
    from vnet.trace import Trace
    from vnet.trace.filters import PacketFilter
    from vnet.trace.session import device_plan

    count = 10
    payload = lambda i: (b"snap-%03d-" % i) * 30  # noqa: E731 -- 270 bytes
    with veth_pair(41 if force == "fentry" else 42) as net:
        plans = [device_plan(resolve_device(net.spec1), ("egress",)),
                 resolver.plan(resolver.resolve(catalog.BY_NAME["veth:xmit"], force)),
                 resolver.plan(resolver.resolve(catalog.BY_NAME["net:netif_receive_skb"], "tp_btf"))]
        probes = (f"dev:{net.spec1}:egress", "veth:xmit", "net:netif_receive_skb")
        with Trace(plans, snaplen=SNAP, packet_filter=PacketFilter(expression=f"udp port {PORT}")) as t, \
                udp_sink(net.ns2, PORT) as sink:
            send_udp(net.ns1, net.ip2, PORT, count=count, payload_fn=payload)
            assert sink.received(expect=count, timeout=10) == count
            events = collect(t, lambda ev: all(len(ours(ev, p, PORT)) >= count for p in probes))
    sent = {payload(i) for i in range(count)}
    for p in probes:
        evs = ours(events, p, PORT)
        assert len(evs) == count, (p, len(evs))
        for e in evs:
            data = bytes.fromhex(e["packet"])
            assert len(data) == SNAP and e["packet_link"] == "ethernet" and e["packet_len"] == 42 + 270, (p, e)
            assert data[12:14] == b"\x08\x00" and data[23] == 17
            assert data[26:30] == ipaddress.IPv4Address(net.ip1).packed
            assert any(s.startswith(data[42:]) for s in sent), (p, data)
    by_id: dict[str, set[str]] = {}
    for e in events:
        if e.get("dport") == PORT:
            by_id.setdefault(e["pkt_id"], set()).add(e["packet"])
    assert len(by_id) == count and all(len(v) == 1 for v in by_id.values())
