"""Snap-length capture for real: `vnet trace --snaplen 128 -w FILE` on a veth pair
(TC hooks of both ends and net:netif_receive_skb, a kernel sk_buff hook), then
`vnet export --to pcapng`, read back by tshark: every packet, all hops of one packet
by `frame.packet_id`, and the captured bytes are the datagrams that were sent."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys

import pytest

from vnet.collector.tracefile import TraceFileReader
from vnet.topology import send_udp

from kernel_support import VnetProcess, veth_pair

pytestmark = pytest.mark.kernel

SNAP = 128
PORT = 5399
COUNT = 20


def payload(i: int) -> bytes:
    return (b"vnet-snap-%04d-" % i) * 20  # 300 bytes: longer than the snap length


def tshark(*args: str) -> list[str]:
    r = subprocess.run(["tshark", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.fixture
def net():
    with veth_pair(78) as pair:
        yield pair


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (make sysdeps)")
def test_snaplen_trace_exports_to_pcapng_that_tshark_reads(net, tmp_path):
    trace = tmp_path / "snap.vnt"
    with VnetProcess("trace", "-i", net.spec1, "-i", net.spec2, "-p", "net:netif_receive_skb", "--snaplen",
                     str(SNAP), "--duration", "2", "-w", str(trace), f"udp port {PORT}") as p:
        p.wait_started()
        send_udp(net.ns1, net.ip2, PORT, count=COUNT, payload_fn=payload)
        assert p.wait(20) == 0, p.stderr

    events = [e for e in TraceFileReader(trace).events() if e.get("dport") == PORT]
    by_packet: dict[str, list[dict]] = {}
    for e in events:
        by_packet.setdefault(e["pkt_id"], []).append(e)
    assert len(by_packet) == COUNT
    hooks = {e["probe"] for e in events}
    assert {f"dev:{net.spec1}:egress", f"dev:{net.spec2}:ingress", "net:netif_receive_skb"} <= hooks, hooks
    sent = {payload(i) for i in range(COUNT)}
    for hops in by_packet.values():
        assert len(hops) >= 3
        for e in hops:
            data = bytes.fromhex(e["packet"])
            # the Ethernet view at every hook (veth has Ethernet headers), SNAP bytes of a longer packet
            assert e["packet_link"] == "ethernet" and len(data) == SNAP and e["packet_len"] == 42 + 300, e
            assert data[12:14] == b"\x08\x00" and data[14] >> 4 == 4 and data[23] == 17
            assert data[26:30] == ipaddress.IPv4Address(net.ip1).packed
            assert data[30:34] == ipaddress.IPv4Address(net.ip2).packed
            assert int.from_bytes(data[36:38], "big") == PORT
            body = data[42:]
            assert any(s.startswith(body) for s in sent), body  # the bytes that were sent
        assert len({e["packet"] for e in hops}) == 1  # the same bytes at every hop of one packet

    out = tmp_path / "snap.pcapng"
    r = subprocess.run([sys.executable, "-m", "vnet", "export", str(trace), "--to", "pcapng", "-o", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    total = len(list(TraceFileReader(trace).events()))
    lines = tshark("-r", str(out))
    assert len(lines) == total  # every packet (ARP etc. left out by the expression)
    rows = tshark("-r", str(out), "-Y", f"udp.dstport == {PORT}", "-T", "fields", "-e", "frame.packet_id",
                  "-e", "frame.len", "-e", "frame.cap_len", "-e", "frame.interface_description",
                  "-e", "frame.comment", "-e", "data.data")
    assert len(rows) == len(events)
    one = next(iter(by_packet))
    hops = tshark("-r", str(out), "-Y", f"frame.packet_id == {int(one, 16)}", "-T", "fields",
                  "-e", "frame.interface_description", "-e", "frame.comment", "-e", "frame.cap_len")
    assert len(hops) == len(by_packet[one])
    assert {h.split("\t")[0] for h in hops} == {e["probe"] for e in by_packet[one]}
    assert all(h.split("\t")[2] == str(SNAP) for h in hops)
    assert sum(" since " in h.split("\t")[1] for h in hops) == len(hops) - 1  # deltas after the first hop
    for row in rows:
        pid, flen, caplen, _desc, _comment, data = row.split("\t")
        assert int(caplen) == SNAP and int(flen) == 42 + 300  # the frame's length at every hook
        assert any(s.startswith(bytes.fromhex(data)) for s in sent)
