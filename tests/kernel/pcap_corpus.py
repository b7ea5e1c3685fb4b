"""The packet corpus of the tcpdump-expression differential test
(test_tcpdump_expressions.py): Ethernet frames crafted with scapy, and the raw
IP packets written into a tun device.

Every frame is unique in the fields vnet's pkt_id covers (a distinct payload,
IP ID, sequence number or ARP address), so each gets its own pkt_id. No frame
provokes an answer from the receiving namespace: unicast frames go to a MAC
address that is not the receiver's (the stack drops them right after the hooks,
as PACKET_OTHERHOST), and the broadcast/multicast ones ask for nothing the
receiver has (no local address, no joined group). So the only packets at the
traced hooks are the ones the test sends.

No VXLAN ports (4789, 8472): vnet identifies VXLAN traffic by its inner packet.
"""

from __future__ import annotations

from dataclasses import dataclass

from scapy.all import (
    ARP,
    GRE,
    ICMP,
    IP,
    LLC,
    STP,
    TCP,
    UDP,
    Dot1AD,
    Dot1Q,
    Dot3,
    Ether,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6NDOptSrcLLAddr,
    IPOption_Router_Alert,
    IPOption,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    Raw,
    RouterAlert,
    SCTP,
    SCTPChunkData,
)

# Ethernet addresses. None is the receiver's: unicast IP/ARP is dropped as
# PACKET_OTHERHOST after the hooks (no reply, no ICMP error).
MAC_A = "02:00:00:00:0a:01"      # the usual source
MAC_A2 = "02:00:00:00:0a:02"     # a second source
MAC_GW = "02:00:00:00:0b:01"     # the usual unicast destination
MAC_OTHER = "02:00:00:00:0c:07"  # another unicast destination
BROADCAST = "ff:ff:ff:ff:ff:ff"

# The end of a frame that tells the test all earlier ones went through both hooks
# (an AF_PACKET socket bound to this ethertype gets it after TC ingress).
SENTINEL_ETHERTYPE = 0x88B6


@dataclass(frozen=True)
class Frame:
    name: str
    data: bytes

    def summary(self) -> str:
        return Ether(self.data).summary()


@dataclass(frozen=True)
class IpPacket:
    """A raw IPv4/IPv6 packet (no link header), as written into a tun device."""

    name: str
    data: bytes

    def summary(self) -> str:
        return (IP(self.data) if self.data[0] >> 4 == 4 else IPv6(self.data)).summary()


def _tag(i: int) -> bytes:
    """A payload unique to frame i."""
    return b"vnet-corpus-%03d;" % i


def _frames() -> list[tuple[str, object]]:
    """(name, scapy packet); payloads are filled in by ethernet_frames()."""
    e = lambda dst=MAC_GW, src=MAC_A: Ether(dst=dst, src=src)  # noqa: E731
    ip = IP
    six = IPv6
    dns_query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"   # id 0x1234, RD, 1 question
    dns_reply = b"\x12\x34\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00"
    return [
        # -- IPv4 UDP
        ("udp dns query", e() / ip(src="10.9.1.5", dst="10.9.2.7", ttl=64) / UDP(sport=40000, dport=53)
         / Raw(dns_query)),
        ("udp dns reply", e(MAC_A, MAC_GW) / ip(src="10.9.2.7", dst="10.9.1.5", ttl=63) / UDP(sport=53, dport=40000)
         / Raw(dns_reply)),
        ("udp 1500->2000 (portrange edges)", e() / ip(src="10.9.1.6", dst="10.9.2.200") / UDP(sport=1500, dport=2000)),
        ("udp 999->2001 (outside the range)", e() / ip(src="10.9.1.6", dst="10.9.2.200") / UDP(sport=999, dport=2001)),
        ("udp 1000->9999 to 192.168.5.1", e() / ip(src="10.9.1.20", dst="192.168.5.1", ttl=30)
         / UDP(sport=1000, dport=9999)),
        ("udp ntp ttl 1", e(MAC_OTHER) / ip(src="192.168.5.77", dst="10.9.1.5", ttl=1) / UDP(sport=123, dport=123)),
        ("udp mdns to 224.0.0.251", e("01:00:5e:00:00:fb") / ip(src="10.9.1.5", dst="224.0.0.251", ttl=255)
         / UDP(sport=5353, dport=5353)),
        ("udp dhcp broadcast", e(BROADCAST, MAC_A2) / ip(src="0.0.0.0", dst="255.255.255.255", ttl=64)
         / UDP(sport=68, dport=67)),
        ("udp 1400 bytes to 8080", e() / ip(src="10.9.1.5", dst="10.9.2.7") / UDP(sport=33000, dport=8080), 1400),
        ("udp quic tos 0x10", e() / ip(src="10.9.2.200", dst="192.168.5.1", tos=0x10) / UDP(sport=50000, dport=443),
         300),
        ("udp exactly 100 bytes", e() / ip(src="10.9.1.20", dst="10.9.2.7") / UDP(sport=7001, dport=7002), 100),
        ("udp exactly 101 bytes", e() / ip(src="10.9.1.20", dst="10.9.2.7") / UDP(sport=7001, dport=7003), 101),
        ("udp ip options (ihl 6, router alert)", e() / ip(src="10.9.1.5", dst="10.9.2.7",
                                                         options=[IPOption_Router_Alert()])
         / UDP(sport=7100, dport=7000)),
        ("udp to a multicast group 239.1.2.3", e("01:00:5e:01:02:03", MAC_A2) / ip(src="10.9.2.7", dst="239.1.2.3",
                                                                                   ttl=8)
         / UDP(sport=6000, dport=6001), 200),
        # -- IPv4 TCP
        ("tcp syn to 80", e() / ip(src="10.9.1.5", dst="10.9.2.7") / TCP(sport=45000, dport=80, flags="S", seq=1000)),
        ("tcp syn+ack from 80", e(MAC_A, MAC_GW) / ip(src="10.9.2.7", dst="10.9.1.5")
         / TCP(sport=80, dport=45000, flags="SA", seq=5000, ack=1001)),
        ("tcp ack to 80", e() / ip(src="10.9.1.5", dst="10.9.2.7")
         / TCP(sport=45000, dport=80, flags="A", seq=1001, ack=5001)),
        ("tcp psh+ack http get", e() / ip(src="10.9.1.5", dst="10.9.2.7")
         / TCP(sport=45000, dport=80, flags="PA", seq=1001, ack=5001), 300),
        ("tcp fin+ack from 80", e(MAC_A, MAC_GW) / ip(src="10.9.2.7", dst="10.9.1.5")
         / TCP(sport=80, dport=45000, flags="FA", seq=5001, ack=1301)),
        ("tcp rst from 443", e() / ip(src="10.9.1.6", dst="10.9.1.20") / TCP(sport=443, dport=51000, flags="R",
                                                                            seq=77)),
        ("tcp syn to 443 (192.168.5.1)", e() / ip(src="10.9.1.6", dst="192.168.5.1")
         / TCP(sport=51001, dport=443, flags="S", seq=2000)),
        ("tcp psh+ack 1200 bytes from 443", e(MAC_A, MAC_GW) / ip(src="192.168.5.1", dst="10.9.1.6", ttl=50)
         / TCP(sport=443, dport=51001, flags="PA", seq=9000, ack=2001), 1200),
        ("tcp syn with options to 8080", e() / ip(src="10.9.2.200", dst="10.9.1.5")
         / TCP(sport=1024, dport=8080, flags="S", seq=3000,
               options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7), ("NOP", None)])),
        ("tcp ack+urg to 22", e() / ip(src="10.9.1.20", dst="10.9.2.7")
         / TCP(sport=2222, dport=22, flags="AU", seq=4000, ack=1, urgptr=3)),
        ("tcp syn+ece+cwr to 443", e() / ip(src="10.9.1.5", dst="10.9.2.7")
         / TCP(sport=60000, dport=443, flags="SEC", seq=6000)),
        ("tcp ip options (ihl 7, 8 nops)", e() / ip(src="10.9.1.6", dst="10.9.2.7", options=[IPOption(b"\x01" * 8)])
         / TCP(sport=3000, dport=1999, flags="PA", seq=7000, ack=1), 120),
        ("tcp bgp ttl 255 tos 0xb8", e() / ip(src="192.168.5.77", dst="192.168.5.1", ttl=255, tos=0xB8)
         / TCP(sport=179, dport=40001, flags="PA", seq=8000, ack=1), 80),
        # -- ICMP
        ("icmp echo request", e() / ip(src="10.9.1.5", dst="10.9.2.7") / ICMP(type=8, id=0x1111, seq=1)),
        ("icmp echo reply", e(MAC_A, MAC_GW) / ip(src="10.9.2.7", dst="10.9.1.5") / ICMP(type=0, id=0x1111, seq=1)),
        ("icmp port unreachable", e(MAC_A, MAC_GW) / ip(src="10.9.2.7", dst="10.9.1.5")
         / ICMP(type=3, code=3) / ip(src="10.9.1.5", dst="10.9.2.7") / UDP(sport=40011, dport=33434)),
        ("icmp time exceeded", e(MAC_A, MAC_GW) / ip(src="192.168.5.1", dst="10.9.1.6", ttl=250)
         / ICMP(type=11, code=0) / ip(src="10.9.1.6", dst="10.9.2.7", ttl=1) / UDP(sport=40012, dport=33435)),
        ("icmp echo to a subnet broadcast", e(BROADCAST, MAC_A2) / ip(src="10.9.1.20", dst="10.9.1.255")
         / ICMP(type=8, id=0x2222, seq=7)),
        ("icmp echo 1000 bytes ttl 3", e() / ip(src="192.168.5.77", dst="10.9.2.200", ttl=3)
         / ICMP(type=8, id=0x3333, seq=2), 1000),
        ("icmp redirect", e(MAC_A, MAC_GW) / ip(src="10.9.2.1", dst="10.9.2.200") / ICMP(type=5, code=1,
                                                                                         gw="10.9.2.254")
         / ip(src="10.9.2.200", dst="192.168.5.1") / UDP(sport=40013, dport=53)),
        # -- IPv4 fragments (one datagram in three, and a TCP first fragment)
        ("ipv4 first fragment udp to 53", e() / ip(src="10.9.1.5", dst="10.9.2.7", id=0x4242, flags="MF", frag=0)
         / UDP(sport=41000, dport=53, len=8 + 3000), 1200),
        ("ipv4 middle fragment", e() / ip(src="10.9.1.5", dst="10.9.2.7", id=0x4242, flags="MF", frag=148, proto=17),
         1200),
        ("ipv4 last fragment", e() / ip(src="10.9.1.5", dst="10.9.2.7", id=0x4242, frag=296, proto=17), 600),
        ("ipv4 first fragment tcp to 80", e() / ip(src="10.9.1.6", dst="10.9.2.7", id=0x4343, flags="MF", frag=0)
         / TCP(sport=45555, dport=80, flags="PA", seq=11, ack=12), 700),
        # -- other IPv4 protocols
        ("gre", e() / ip(src="10.9.1.5", dst="10.9.2.7") / GRE(proto=0x0800) / ip(src="172.16.0.1", dst="172.16.0.2")
         / UDP(sport=1, dport=2)),
        ("esp", e() / ip(src="10.9.1.6", dst="192.168.5.1", proto=50) / Raw(b"\x00\x00\x10\x01\x00\x00\x00\x01"), 90),
        ("sctp data to 2905", e() / ip(src="10.9.1.5", dst="10.9.2.7")
         / SCTP(sport=1234, dport=2905) / SCTPChunkData(tsn=1, data=b"sctp")),
        # -- 802.1Q
        ("vlan 10 udp dns", e() / Dot1Q(vlan=10) / ip(src="10.9.1.5", dst="10.9.2.7") / UDP(sport=40001, dport=53)),
        ("vlan 20 tcp syn to 80", e() / Dot1Q(vlan=20) / ip(src="10.9.1.6", dst="10.9.2.7")
         / TCP(sport=45001, dport=80, flags="S", seq=12000)),
        ("vlan 20 udp 1001 bytes on the wire", e() / Dot1Q(vlan=20) / ip(src="10.9.2.200", dst="192.168.5.1")
         / UDP(sport=40002, dport=8080), 1001),
        ("vlan 20 udp 999 bytes on the wire", e() / Dot1Q(vlan=20) / ip(src="10.9.2.200", dst="192.168.5.1")
         / UDP(sport=40003, dport=8080), 999),
        ("vlan 30 prio 5 ipv6 udp dns", e() / Dot1Q(vlan=30, prio=5) / six(src="fd00:9:1::5", dst="fd00:9:2::7")
         / UDP(sport=40004, dport=53)),
        ("vlan 20 arp request", e(BROADCAST) / Dot1Q(vlan=20) / ARP(op=1, hwsrc=MAC_A, psrc="10.9.1.5",
                                                                     pdst="10.9.1.99")),
        ("vlan 0 (priority tag) icmp echo", e() / Dot1Q(vlan=0, prio=3) / ip(src="10.9.1.5", dst="10.9.2.7")
         / ICMP(type=8, id=0x4444, seq=3)),
        ("vlan 10 tcp rst to 443", e() / Dot1Q(vlan=10) / ip(src="10.9.1.20", dst="192.168.5.1")
         / TCP(sport=51002, dport=443, flags="R", seq=13000)),
        ("qinq 100/20 udp", e() / Dot1AD(vlan=100) / Dot1Q(vlan=20) / ip(src="10.9.1.5", dst="10.9.2.7")
         / UDP(sport=40005, dport=5000)),
        # -- ARP
        ("arp request", e(BROADCAST) / ARP(op=1, hwsrc=MAC_A, psrc="10.9.1.5", pdst="10.9.2.7")),
        ("arp reply", e(MAC_GW, MAC_A2) / ARP(op=2, hwsrc=MAC_A2, psrc="10.9.2.7", hwdst=MAC_GW, pdst="10.9.1.5")),
        ("arp gratuitous", e(BROADCAST, MAC_A2) / ARP(op=1, hwsrc=MAC_A2, psrc="192.168.5.1", pdst="192.168.5.1")),
        # -- IPv6
        ("ipv6 udp dns query", e() / six(src="fd00:9:1::5", dst="fd00:9:2::7") / UDP(sport=40000, dport=53)
         / Raw(dns_query)),
        ("ipv6 udp dns reply", e(MAC_A, MAC_GW) / six(src="fd00:9:2::7", dst="fd00:9:1::5")
         / UDP(sport=53, dport=40000) / Raw(dns_reply)),
        ("ipv6 tcp syn to 443", e() / six(src="fd00:9:1::5", dst="fd00:9:2::7")
         / TCP(sport=46000, dport=443, flags="S", seq=14000)),
        ("ipv6 tcp psh+ack 800 bytes to 8080", e() / six(src="fd00:9:1::6", dst="fd00:9:1::5", tc=0xB8)
         / TCP(sport=46001, dport=8080, flags="PA", seq=15000, ack=1), 800),
        ("ipv6 icmp echo request", e() / six(src="fd00:9:1::5", dst="fd00:9:2::7") / ICMPv6EchoRequest(id=7, seq=1)),
        ("ipv6 icmp echo reply", e(MAC_A, MAC_GW) / six(src="fd00:9:2::7", dst="fd00:9:1::5")
         / ICMPv6EchoReply(id=7, seq=1)),
        ("ipv6 neighbour solicitation", e("33:33:ff:00:00:05") / six(src="fe80::1", dst="ff02::1:ff00:5", hlim=255)
         / ICMPv6ND_NS(tgt="fd00:9:1::5") / ICMPv6NDOptSrcLLAddr(lladdr=MAC_A)),
        ("ipv6 neighbour advertisement", e() / six(src="fe80::2", dst="fe80::1", hlim=255)
         / ICMPv6ND_NA(tgt="fd00:9:2::7", R=0, S=1, O=1)),
        ("ipv6 hop-by-hop udp 1500", e() / six(src="fd00:9:1::5", dst="fd00:9:2::7")
         / IPv6ExtHdrHopByHop(options=[RouterAlert()]) / UDP(sport=40006, dport=1500)),
        ("ipv6 first fragment udp to 53", e() / six(src="fd00:9:1::6", dst="fd00:9:2::7")
         / IPv6ExtHdrFragment(id=0x5151, m=1, offset=0) / UDP(sport=40007, dport=53, len=8 + 3000), 400),
        ("ipv6 later fragment", e() / six(src="fd00:9:1::6", dst="fd00:9:2::7")
         / IPv6ExtHdrFragment(id=0x5151, m=0, offset=49, nh=17), 400),
        ("ipv6 udp multicast mdns", e("33:33:00:00:00:fb", MAC_A2) / six(src="fe80::5", dst="ff02::fb", hlim=255)
         / UDP(sport=5353, dport=5353)),
        ("ipv6 tcp ack hop limit 1", e() / six(src="fd00:9:5::77", dst="fd00:9:2::200", hlim=1)
         / TCP(sport=179, dport=40010, flags="A", seq=16000, ack=2)),
        # -- not IP
        # (60 bytes, the Ethernet minimum: vnet hashes the first 28 bytes after the header)
        ("ethertype 0x88b5", e() / Raw(b""), 60),  # the type is set in _with_payload
        ("lldp", e("01:80:c2:00:00:0e", MAC_A2) / Raw(b""), 60),
        ("802.3 stp bpdu", Dot3(dst="01:80:c2:00:00:00", src=MAC_A2) / LLC() / STP(rootid=0x8000, bridgeid=0x8000)),
    ]


def _with_payload(i: int, name: str, pkt, size: int | None):
    """Append a payload unique to frame i (after any payload the entry has, such as a
    DNS header: the tag stays within the 32 payload bytes pkt_id hashes); with
    `size`, pad the payload to that many bytes on the wire."""
    if name == "ethertype 0x88b5":
        pkt[Ether].type = 0x88B5
    elif name == "lldp":
        pkt[Ether].type = 0x88CC
    if ARP in pkt:
        # No payload: the first 28 bytes of the ARP header enter pkt_id, and the
        # ARP frames differ in their addresses.
        assert size is None
        return pkt
    if Raw in pkt:
        pkt[Raw].load += _tag(i)
    else:
        pkt = pkt / Raw(_tag(i))
    wire = len(bytes(pkt))
    if size is not None:
        if size < wire:
            raise ValueError(f"frame {i} ({name}) is {wire} bytes, more than the {size} asked")
        pkt[Raw].load += bytes((i + k) & 0xFF for k in range(size - wire))
        assert len(bytes(pkt)) == size, name
    return pkt


def ethernet_frames() -> list[Frame]:
    frames = []
    for i, entry in enumerate(_frames()):
        name, pkt = entry[0], entry[1]
        size = entry[2] if len(entry) > 2 else None
        pkt = _with_payload(i, name, pkt, size)
        data = bytes(pkt)
        frames.append(Frame(name, data))
    datas = [f.data for f in frames]
    assert len(set(datas)) == len(datas), "corpus frames must be unique"
    assert len({f.name for f in frames}) == len(frames), "corpus names must be unique"
    return frames


def sentinel_frame(nonce: int) -> bytes:
    """A frame that ends a burst; its ethertype is no corpus frame's."""
    return bytes(Ether(dst=MAC_GW, src=MAC_A, type=SENTINEL_ETHERTYPE) / Raw(b"vnet-sentinel-%016x" % nonce))


def ip_packets(frames: list[Frame] | None = None) -> list[IpPacket]:
    """The IPv4/IPv6 packets of the untagged corpus frames, without their link header."""
    out = []
    for f in frames or ethernet_frames():
        ethertype = int.from_bytes(f.data[12:14], "big")
        if ethertype in (0x0800, 0x86DD):
            out.append(IpPacket(f.name, f.data[14:]))
    return out
