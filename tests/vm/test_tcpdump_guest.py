"""tcpdump expressions on Linux 6.1: the spliced classic-BPF translation must
pass the older verifier at every hook kind (TC direct packet access; fentry,
kprobe, tp_btf and raw_tp through bpf_probe_read_kernel) and select the same
packets there as libpcap would."""

from __future__ import annotations

import socket

import pytest

from vm_support import collect, veth_pair

# Expressions whose translation exercises every load kind: absolute and indexed
# loads, the IPv4 header length (ldxb 4*([k]&0xf)), VLAN, IPv6, scratch memory.
HARD = ["udp and dst port 7001", "vlan 10 and tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn",
        "ip6 and (udp or tcp) and portrange 100-200", "ip[2:2] > 500 or icmp[icmptype] = icmp-echo",
        "not (src net 10.0.0.0/8 or ether broadcast) and ip[8] < 64",
        "(tcp[0:2] > 1000 and tcp[2:2] < 3000) or (udp[4:2] - 8 > 100)"]
HOOKS = [("net:netif_receive_skb", "tp_btf"), ("net:netif_receive_skb", "raw_tp"),
         ("veth:xmit", "fentry"), ("veth:xmit", "kprobe")]


def _plan(name, force):
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver

    res = resolver.resolve(catalog.BY_NAME[name], force)
    assert res.available, f"{name}@{force}: {res.why_not}"
    return resolver.plan(res)


@pytest.mark.parametrize("text", HARD)
def test_hard_expressions_pass_the_6_1_verifier_at_every_hook_kind(text, guest_modules):
    from vnet.trace import Trace
    from vnet.trace.filters import PacketFilter

    with veth_pair(61) as net:
        from vnet.probes.device import resolve
        from vnet.trace.session import device_plan

        plans = [device_plan(resolve(net.spec2))] + [_plan(n, f) for n, f in HOOKS]
        with Trace(plans, packet_filter=PacketFilter(expression=text)) as t:
            assert {h.kind for h in t.hooks} >= {"tcx", "tp_btf", "raw_tp", "fentry", "kprobe"} - {"tcx"}
            assert not t.skipped


@pytest.mark.parametrize("hook", HOOKS, ids=[f"{n}@{f}" for n, f in HOOKS])
def test_expression_selects_the_packets_libpcap_would(hook, guest_modules):
    """UDP to two ports and a TCP exchange cross the veth; only 'udp and dst
    port 7001' is reported, at the TC hook and at the function/tracepoint hook."""
    from vnet.probes.device import resolve
    from vnet.topology import send_udp, tcp_exchange
    from vnet.trace import Trace
    from vnet.trace.filters import PacketFilter
    from vnet.trace.session import device_plan

    name, force = hook
    with veth_pair(62) as net:
        devb = resolve(net.spec2)
        flt = PacketFilter(expression="udp and dst port 7001", ifaces=(devb.ifname,), netns=devb.netns)
        if name == "veth:xmit":  # the sender's end transmits
            flt = PacketFilter(expression="udp and dst port 7001")
        with Trace([device_plan(devb, ("ingress",)), _plan(name, force)], packet_filter=flt) as t:
            send_udp(net.ns1, net.ip2, 7001, count=5)
            send_udp(net.ns1, net.ip2, 7002, count=5)
            assert tcp_exchange(net.ns1, net.ns2, net.ip2, 7001, 2000) == 2000
            events = collect(t, lambda ev: sum(e["probe"] == name for e in ev) >= 5
                             and sum(e["probe"].startswith("dev:") for e in ev) >= 5, timeout=30)
            stats = t.stats()
    assert events and all(e["proto"] == "udp" and e["dport"] == 7001 for e in events), events[:3]
    assert sum(e["probe"] == name for e in events) >= 5
    assert sum(e["probe"].startswith("dev:") for e in events) == 5
    assert stats.filtered > 0
    socket.gethostname()  # the guest is alive and well
