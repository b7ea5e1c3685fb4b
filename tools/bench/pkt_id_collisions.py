#!/usr/bin/env python3
"""Measure pkt_id collisions on a realistic mix of distinct packets.

Every packet goes through the real tc program in the running kernel
(BPF_PROG_TEST_RUN) and its pkt_id is read back from the ring buffer, exactly
as a trace would see it. Packets are distinct by construction (each carries a
unique (flow, IP ID / TCP seq / payload) combination); any repeated pkt_id is a
collision. Needs root. Usage: pkt_id_collisions.py [N] (default 1,000,000).
"""

from __future__ import annotations

import random
import struct
import sys
import time

from vnet.binding import BpfObject, RingBuffer
from vnet.objects import object_path

ETH_V4 = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
ETH_V6 = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x86\xdd"


def ipv4(proto: int, src: bytes, dst: bytes, ident: int, l4: bytes) -> bytes:
    return ETH_V4 + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, 0x4000, 64, proto, 0, src, dst) + l4


def ipv6(nh: int, src: bytes, dst: bytes, flow: int, l4: bytes) -> bytes:
    return ETH_V6 + struct.pack("!IHBB16s16s", 6 << 28 | flow, len(l4), nh, 64, src, dst) + l4


def packet(i: int, rng: random.Random) -> bytes:
    """A realistic mix: 45% TCP, 35% UDP, 10% ICMP, 10% IPv6 UDP/TCP; a few
    thousand flows, so most packets differ only in IP ID, seq or payload."""
    flow = rng.randrange(5000)
    src = struct.pack("!I", 0x0A000000 | flow * 7919 % (1 << 24))
    dst = struct.pack("!I", 0x0A800000 | flow % 251)
    sport, dport = 1024 + flow * 13 % 60000, (80, 443, 53, 4789, 8080)[flow % 5]
    payload = struct.pack("!Q", i) + rng.randbytes(rng.choice((0, 8, 24, 200)))
    kind = rng.random()
    if kind < 0.45:
        tcp = struct.pack("!HHIIBBHHH", sport, dport, i * 1448 & 0xFFFFFFFF, rng.getrandbits(32), 5 << 4, 0x18,
                          502, 0, 0)
        return ipv4(6, src, dst, i & 0xFFFF, tcp + payload)
    if kind < 0.80:
        udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
        return ipv4(17, src, dst, i & 0xFFFF, udp + payload)
    if kind < 0.90:
        icmp = struct.pack("!BBHHH", 8, 0, 0, flow, i & 0xFFFF)
        return ipv4(1, src, dst, i & 0xFFFF, icmp + payload)
    s6, d6 = b"\xfd" + bytes(11) + src, b"\xfd" + bytes(11) + dst
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return ipv6(17, s6, d6, flow, udp + payload)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rng = random.Random(20261125)
    seen: dict[int, int] = {}
    collisions = 0
    start = time.monotonic()
    with BpfObject(object_path("tc_trace")) as obj:
        obj.maps["vnet_events"].max_entries = 64 << 20
        obj.keep_programs(["vnet_tc_ingress"])
        obj.load()
        ring = RingBuffer(obj.maps["vnet_events"])
        layout = obj.btf.struct("vnet_event")
        pkt_id = layout.field("pkt_id")
        prog = obj.programs["vnet_tc_ingress"]
        done = 0
        for i in range(n):
            prog.test_run(packet(i, rng))
            if i % 50_000 == 49_999 or i == n - 1:
                for raw in ring.drain():
                    value = int.from_bytes(raw[pkt_id.offset:pkt_id.offset + 8], "little")
                    if value in seen:
                        collisions += 1
                    seen[value] = done
                    done += 1
    elapsed = time.monotonic() - start
    print(f"{n} distinct packets, {done} events, {len(seen)} distinct pkt_ids, {collisions} collisions "
          f"({elapsed:.0f} s)")
    return 1 if collisions or done != n else 0


if __name__ == "__main__":
    sys.exit(main())
