"""The classic-to-eBPF translator against libpcap's own interpreter, in the
running kernel: each classic program is spliced into the real TC program,
loaded (the verifier must accept it) and run with BPF_PROG_TEST_RUN on real
packet bytes; the program's counters say whether it kept or left out each
packet, and pcap_offline_filter must say the same.

Two sources of classic programs: what libpcap compiles from expressions, and
seeded random programs using every instruction (ALU with K and X, division
and modulo by a zero X, shifts, scratch memory, indirect loads, loads past the
end), which libpcap's compiler rarely or never emits.
"""

from __future__ import annotations

import random
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.sctp import SCTP

from vnet.binding import BpfObject, pcap
from vnet.binding.pcap import ClassicInsn
from vnet.objects import object_path
from vnet.tcpdump import Expression, compile, stub_bodies
from vnet.trace.filters import FILTER_ON_PCAP, PacketFilter

MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
PACKETS = [
    Ether(**MACS) / IP(src="10.1.0.1", dst="10.2.0.2") / UDP(sport=1234, dport=53) / (b"q" * 30),
    Ether(**MACS) / IP(src="10.1.0.9", dst="10.2.0.2", ttl=3) / UDP(sport=53, dport=4000) / (b"r" * 300),
    Ether(**MACS) / IP(src="10.1.0.1", dst="10.3.0.3") / TCP(sport=40000, dport=80, flags="S"),
    Ether(**MACS) / IP(src="10.3.0.3", dst="10.1.0.1") / TCP(sport=80, dport=40000, flags="SA") / (b"h" * 10),
    Ether(**MACS) / IP(src="10.1.0.1", dst="10.3.0.3", options=b"\x01\x01\x01\x00") / TCP(dport=443, flags="PA") / b"x",
    Ether(**MACS) / IP(src="10.1.0.1", dst="10.2.0.2", flags="MF", frag=0) / UDP(dport=53) / (b"f" * 64),
    Ether(**MACS) / IP(src="10.1.0.1", dst="10.2.0.2", frag=8) / (b"g" * 40),
    Ether(**MACS) / IP(src="10.4.0.4", dst="10.1.0.1") / ICMP(type=8) / (b"p" * 56),
    Ether(**MACS) / IP(src="10.1.0.1", dst="10.4.0.4") / ICMP(type=0) / (b"p" * 56),
    Ether(**MACS) / IP(src="10.1.0.1", dst="10.4.0.4") / ICMP(type=3, code=3) / (b"e" * 28),
    Ether(**MACS) / IPv6(src="fd00::1", dst="fd00::2") / UDP(dport=53) / (b"6" * 20),
    Ether(**MACS) / IPv6(src="fd00::2", dst="fd00:1::9") / TCP(dport=22, flags="S"),
    Ether(src=MACS["src"], dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.1.0.2"),
    Ether(src=MACS["src"], dst="01:00:5e:00:00:fb") / IP(src="10.1.0.1", dst="224.0.0.251") / UDP(dport=5353) / b"m",
    Ether(**MACS) / Dot1Q(vlan=10) / IP(src="10.1.0.1", dst="10.2.0.2") / UDP(dport=53) / b"v",
    Ether(**MACS) / Dot1Q(vlan=20) / IPv6(src="fd00::1", dst="fd00::2") / TCP(dport=80, flags="S"),
    Ether(**MACS, type=0x88B5) / (b"local experimental" * 3),
    Ether(**MACS) / IP(src="10.1.0.1", dst="10.2.0.2") / UDP(sport=1500, dport=1999) / (b"z" * 1200),
]
FRAMES = [bytes(p) for p in PACKETS]

EXPRESSIONS = [
    "udp", "tcp", "icmp", "ip6", "arp", "vlan", "vlan 20", "vlan and udp", "not ip and not ip6",
    "host 10.1.0.1", "src host 10.3.0.3", "dst net 10.2.0.0/16", "net 10.4.0.0/24 or net fd00:1::/32",
    "port 53", "src port 80", "dst port 40000 or dst port 22", "portrange 1000-2000", "tcp dst portrange 1-100",
    "tcp[tcpflags] & tcp-syn != 0", "tcp[tcpflags] == tcp-syn|tcp-ack", "tcp[13] & 8 != 0",
    "icmp[icmptype] == icmp-echo", "icmp[icmptype] != icmp-echo and icmp", "icmp6 or icmp[0] = 3",
    "ip[8] < 10", "ip[2:2] > 300", "ip[6:2] & 0x1fff != 0", "ip[6] & 0x20 != 0", "ip[0] & 0xf > 5",
    "udp[8:4] = 0x71717171", "tcp[20:2] = 0x6868", "greater 400", "less 70", "len >= 100 and len <= 1000",
    "ether broadcast", "ether multicast", "ether proto 0x88b5", "ip multicast", "ether[0] & 1 = 0 and ip",
    "ip6 and udp", "ip6 and ip6[6] = 6", "proto 17 and not port 53",
    "(tcp or udp) and not (port 53 or port 80)", "ip and not (src net 10.1.0.0/16)",
    "ether[1500:4] = 0 or ip[2000] = 1",
]


def _load(expr: Expression, config: dict | None = None) -> BpfObject:
    obj = BpfObject(object_path("tc_trace"))
    try:
        obj.set_config("tc_cfg", {"probe_id": 0, **(config or {"f_pcap": 1})})
        obj.keep_programs(["vnet_tc_ingress"])
        obj.replace_functions(stub_bodies(expr))
        obj.load()
    except BaseException:
        obj.close()
        raise
    return obj


def _kept(obj: BpfObject, frame: bytes) -> bool:
    """Run the TC program on `frame`; whether it kept the packet (an event) or left it out."""
    def counters():
        rows = obj.maps["vnet_stats"].lookup(b"\0\0\0\0")
        return [sum(struct.unpack_from("<4Q", r)[i] for r in rows) for i in range(4)]

    before = counters()
    obj.programs["vnet_tc_ingress"].test_run(frame)
    after = counters()
    seen, emitted, filtered = (after[i] - before[i] for i in (0, 1, 3))
    assert seen == 1 and emitted + filtered == 1, (seen, emitted, filtered)
    return emitted == 1


@pytest.mark.parametrize("text", EXPRESSIONS)
def test_expression_agrees_with_libpcap(text):
    expr = compile(text)
    with _load(expr) as obj:
        got = [_kept(obj, f) for f in FRAMES]
    want = [expr.matches(f) for f in FRAMES]
    wrong = [f"{'kept' if g else 'left out'}: {PACKETS[i].summary()}" for i, (g, w) in enumerate(zip(got, want))
             if g != w]
    assert not wrong, f"{text!r} disagrees with libpcap on:\n" + "\n".join(wrong)


def test_the_expressions_discriminate():
    """Most expressions keep some packets and leave out others: the table tests something."""
    proper = [t for t in EXPRESSIONS if 0 < sum(compile(t).matches(f) for f in FRAMES) < len(FRAMES)]
    assert len(proper) >= len(EXPRESSIONS) - 3, set(EXPRESSIONS) - set(proper)


# -- the expression's own criteria, tested first (vnet/tcpdump/prejudge.py) --------------------------------

PREJUDGE_PACKETS = PACKETS + [
    Ether(**MACS) / IP(src="10.1.0.1", dst="10.2.0.2") / SCTP(sport=5000, dport=53) / (b"s" * 16),
    Ether(**MACS) / IPv6(src="fd00::1", dst="fd00::2") / SCTP(sport=80, dport=5000),
    Ether(**MACS) / IPv6(src="fd00::1", dst="fd00:1::9") / IPv6ExtHdrFragment(nh=17) / UDP(dport=53) / b"6f",
    Ether(**MACS) / IP(src="10.1.0.1", dst="10.2.0.2", proto=17) / b"ab",  # too short for its ports
    Ether(**MACS) / IP(src="10.1.0.1", dst="10.2.0.2", frag=16, proto=6) / (b"t" * 24),
]
PREJUDGE_FRAMES = [bytes(p) for p in PREJUDGE_PACKETS]
PREJUDGED = ["udp", "tcp", "sctp", "icmp", "icmp6", "ip6", "udp port 53", "tcp and src port 80", "udp and dst port 53",
             "sctp dst port 53", "tcp dst port 80 and src host 10.1.0.1", "dst net 10.2.0.0/16",
             "ip6 net fd00:1::/32", "host 10.1.0.1 and port 53", "ip6 and udp and not port 53",
             "tcp port 80 and tcp[tcpflags] & tcp-syn != 0",
             # read from libpcap's code: `or`, `not`, parentheses, inherited qualifiers, `vlan`
             "(udp and port 53) or (tcp and port 53)", "host 10.1.0.1 or host 10.2.0.2", "udp port 53 or 80",
             "tcp port 80 or tcp port 443", "not (tcp or sctp) and ip6", "tcp[13] & 2 != 0", "vlan and udp",
             "dst net fd00::/16 or dst net fd00:1::/32",
             # port criteria where SCTP packets are left to the expression (VNET_PLAIN_SCTP_PORTS_LATER)
             "port 53", "sctp or port 80", "dst port 53 and host 10.1.0.1",
             # no plain IP packet passes: all rejected first
             "arp", "mpls",
             # sets: one of up to 4 protocols, one of up to 4 ports either way round
             "port 80 or port 443", "udp or tcp", "tcp or icmp", "port 53 or 80", "icmp or icmp6",
             "host 10.1.0.1 and (port 80 or port 443)", "src port 53 or dst port 80",
             "host 10.1.0.9 or host 10.4.0.4", "(host 10.3.0.3 or host 10.2.0.2) and tcp",
             # ... and IPv6 addresses, alone or with IPv4 ones (a dual-stack host)
             "ip6 host fd00::1 or ip6 host fd00:1::9", "host 10.1.0.1 or host fd00::2",
             "(host 10.4.0.4 or host fd00:1::9) and tcp",
             # ports excluded, either way round
             "not port 53", "not (port 22 or port 80)", "tcp and not port 80", "ip6 and not port 53",
             # ... and IPv4 addresses
             "not host 10.1.0.1", "udp and not (host 10.2.0.2 or host 10.4.0.4)", "not (host 10.1.0.1 or port 22)",
             # ... and IPv4 prefixes, in a set and excluded
             "net 10.2.0.0/16 or net 10.4.0.0/24", "(src net 10.3.0.0/16 or dst host 10.4.0.4) and icmp",
             "not net 10.2.0.0/16", "udp and not (net 10.1.0.0/24 or net 10.4.0.0/16)"]


@pytest.mark.parametrize("text", PREJUDGED)
def test_an_expression_with_its_criteria_first_agrees_with_libpcap(text):
    """The tc program as `vnet trace` loads it: the criteria the expression
    implies reject plain packets first (VNET_FILTER_ON_PCAP); what is left, the
    expression decides. Together: libpcap's verdict on every packet."""
    expr = compile(text)
    config = PacketFilter(expression=text).config()
    assert config.get("f_on") == FILTER_ON_PCAP, config
    with _load(expr, config) as obj:
        got = [_kept(obj, f) for f in PREJUDGE_FRAMES]
    want = [expr.matches(f) for f in PREJUDGE_FRAMES]
    wrong = [f"{'kept' if g else 'left out'}: {PREJUDGE_PACKETS[i].summary()}"
             for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not wrong, f"{text!r} disagrees with libpcap on:\n" + "\n".join(wrong)


@pytest.mark.parametrize("text, wrong", [("udp", {"f_l4_proto": 6}),
                                         ("udp port 53", {"f_ports": (9, 0, 0, 0)}),
                                         ("udp", {"f_l4_protos": bytes((6, 1, 0, 0))}),
                                         ("udp", {"f_hosts_v4": (0x09090909, 0, 0, 0)}),
                                         ("udp", {"f_hosts_v6": bytes.fromhex("fd00" + "00" * 13 + "09") + bytes(48)}),
                                         ("udp port 53", {"f_not_ports": (53, 0, 0, 0)}),
                                         ("ip and udp", {"f_not_hosts_v4": (0x0100010A, 0x0200020A, 0, 0)}),
                                         ("ip and udp", {"f_hosts_v4": (0x0909, 0, 0, 0),  # 9.9.0.0/16
                                                         "f_hosts_v4_mask": (0xFFFF, 0, 0, 0)}),
                                         ("ip and udp", {"f_not_hosts_v4": (0x0A, 0, 0, 0),  # 10.0.0.0/8
                                                         "f_not_hosts_v4_mask": (0xFF, 0, 0, 0)})])
def test_the_criteria_run_before_the_expression(text, wrong):
    """Criteria and sets that contradict the expression (TCP's for `udp`, port 9 for
    port 53, TCP or ICMP for UDP, 9.9.9.9 or fd00::9 for any host, port 53, 10.1.0.1 and 10.2.0.2 excluded,
    9.9.0.0/16 for any host, 10.0.0.0/8 excluded) leave out the plain packets
    it keeps: they are tested, and first, and the test above would see a wrong
    derivation."""
    expr = compile(text)
    with _load(expr, {**PacketFilter(expression=text).config(), **wrong}) as obj:
        got = [_kept(obj, f) for f in PREJUDGE_FRAMES]
    plain = [i for i, p in enumerate(PREJUDGE_PACKETS) if UDP in p and Dot1Q not in p and IPv6ExtHdrFragment
             not in p and (IP not in p or p[IP].frag == 0) and expr.matches(PREJUDGE_FRAMES[i])]
    assert plain and not any(got[i] for i in plain)
    assert not any(got[i] for i, f in enumerate(PREJUDGE_FRAMES) if not expr.matches(f))


# -- random classic programs ---------------------------------------------------------------------------

LD, LDX, ST, STX, ALU, JMP, RET, MISC = range(8)
W, H, B = 0x00, 0x08, 0x10
ABS, IND, MEM, LEN, MSH, IMM = 0x20, 0x40, 0x60, 0x80, 0xA0, 0x00
ALU_OPS = [0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xA0]  # add..neg, mod, xor
JMP_OPS = [0x10, 0x20, 0x30, 0x40]  # jeq, jgt, jge, jset


def random_program(rng: random.Random, n: int = 24) -> list[ClassicInsn]:
    """A valid classic program: scratch memory stored before use, forward jumps,
    no division by a zero constant, no shift by 32 or more (undefined in C, so in
    libpcap's interpreter too; vnet gives 0)."""
    prog = [ClassicInsn(IMM | W | LD, 0, 0, rng.getrandbits(32))]
    prog += [ClassicInsn(ST, 0, 0, i) for i in range(16)]
    body = n
    for pc in range(body):
        left = body - pc  # instructions after this one, before the final returns
        kind = rng.choice(["ld", "ld", "ldx", "alu", "alu", "alu", "jmp", "jmp", "mem", "misc", "ret"])
        if kind == "ld":
            mode = rng.choice([ABS, ABS, IND, LEN, IMM, MEM])
            size = rng.choice([W, H, B]) if mode in (ABS, IND) else W
            k = rng.choice([rng.randrange(0, 80), rng.randrange(0, 2000), rng.getrandbits(32)])
            if mode == MEM:
                k = rng.randrange(16)
            if mode == IND:
                k = rng.choice([rng.randrange(0, 64), rng.getrandbits(32)])
            prog.append(ClassicInsn(LD | mode | size, 0, 0, k))
        elif kind == "ldx":
            mode = rng.choice([IMM, LEN, MEM, MSH])
            k = rng.randrange(16) if mode == MEM else rng.choice([rng.randrange(0, 40), rng.getrandbits(8)])
            if mode == IMM:
                k = rng.choice([0, 1, 3, 31, 32, 40, rng.getrandbits(32)])
            prog.append(ClassicInsn(LDX | mode | (B if mode == MSH else W), 0, 0, k))
        elif kind == "alu":
            op = rng.choice(ALU_OPS)
            src = rng.choice([0x00, 0x08])
            k = rng.getrandbits(32)
            if op in (0x30, 0x90) and src == 0:
                k = k or 7
            if op in (0x60, 0x70):
                k = rng.randrange(32)
                if src == 0x08:  # the shift amount must stay below 32 in libpcap's C: set X first
                    prog.append(ClassicInsn(LDX | IMM | W, 0, 0, rng.randrange(32)))
            prog.append(ClassicInsn(ALU | op | (0 if op == 0x80 else src), 0, 0, k))
        elif kind == "jmp":
            op = rng.choice(JMP_OPS + [0x00])
            jt, jf = rng.randrange(min(left, 6)), rng.randrange(min(left, 6))
            if op == 0x00:
                prog.append(ClassicInsn(JMP, 0, 0, rng.randrange(min(left, 4))))
            else:
                prog.append(ClassicInsn(JMP | op | rng.choice([0x00, 0x08]), jt, jf,
                                        rng.choice([0, 1, 0x800, rng.getrandbits(8), rng.getrandbits(32)])))
        elif kind == "mem":
            prog.append(ClassicInsn(rng.choice([ST, STX]), 0, 0, rng.randrange(16)))
        elif kind == "misc":
            prog.append(ClassicInsn(MISC | rng.choice([0x00, 0x80]), 0, 0, 0))
        else:
            prog.append(ClassicInsn(RET | rng.choice([0x00, 0x10]), 0, 0, rng.choice([0, 1, 65535])))
    prog.append(ClassicInsn(RET | 0x10, 0, 0, 0))  # return A
    prog.append(ClassicInsn(RET, 0, 0, 0))
    return prog


def test_random_programs_agree_with_libpcap():
    rng = random.Random(0x766E)
    frames = FRAMES[:6] + [FRAMES[12], FRAMES[-1], FRAMES[16][:16], FRAMES[3][:40], FRAMES[12][:30]]
    disagreements, kept = [], []
    for n in range(60):
        prog = random_program(rng)
        with _load(Expression(f"random #{n}", tuple(prog), None)) as obj:
            for f in frames:
                got, want = _kept(obj, f), pcap.offline_filter(prog, f)
                kept.append(want)
                if got != want:
                    disagreements.append((n, len(f), got, want, pcap.image(prog)))
    assert 0.2 < sum(kept) / len(kept) < 0.8, "the random programs should keep some packets and leave out others"
    assert not disagreements, "\n".join(
        f"program {n} on {size} bytes: vnet {'kept' if g else 'left out'}, libpcap did not:\n  " + "\n  ".join(img)
        for n, size, g, w, img in disagreements[:3])
