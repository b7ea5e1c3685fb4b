"""`vnet analyze` on a trace recorded for real: `vnet trace -w` over both ends of
a veth pair plus the receive tracepoint, UDP sent across, then the analysis of
that file must find the path hop by hop, with every packet on it and positive,
plausible per-hop latencies."""

from __future__ import annotations

import json

from kernel_support import VnetProcess, veth_pair
from vnet.topology import send_udp

PORT = 5411
SENT = 50


def test_analyze_finds_the_veth_path_of_a_real_recording(tmp_path):
    out = tmp_path / "real.vnt"
    with veth_pair(93) as net:
        with VnetProcess("trace", "-i", net.spec1, "-i", net.spec2, "-p", "net:netif_receive_skb",
                         "--filter-iface", net.if2, "--filter-netns", net.ns2, "--duration", "3", "-w", str(out),
                         f"udp and dst port {PORT}") as rec:
            rec.wait_started()
            send_udp(net.ns1, net.ip2, PORT, count=SENT)
            assert rec.wait(20) == 0, rec.stderr
        egress, ingress = f"{net.ns1}/{net.if1}:egress", f"{net.ns2}/{net.if2}:ingress"
        receive = f"net:netif_receive_skb {net.ns2}/{net.if2}"
    with VnetProcess("analyze", str(out), "--json") as a:
        assert a.wait(60) == 0, a.stderr
    report = json.loads("\n".join(a.stdout))
    text = json.dumps(report)
    assert egress in text and ingress in text and receive in text
    with VnetProcess("analyze", str(out), "--slowest", "3") as t:
        assert t.wait(60) == 0, t.stderr
    table = "\n".join(t.stdout)
    assert egress in table and ingress in table
    segments = report["segments"]
    hop = next(s for s in segments if s["from"] == egress and s["to"] == receive)
    assert hop["count"] == SENT, hop
    assert 0 < hop["min_ns"] <= hop["p50_ns"] <= hop["max_ns"] < 1_000_000_000, hop
