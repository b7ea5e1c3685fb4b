"""What a tcpdump expression says of a plain packet's tuple, as field-filter
criteria the programs test before the expression (step 2a of
bpf/src/vnet_filter.bpf.h, `f_on` VNET_FILTER_ON_PCAP).

A program reads a plain IPv4/IPv6 packet's protocol, addresses and ports in
~20 ns; the spliced expression costs 10-20 ns more at kernel hooks. This
module gives criteria every packet the expression accepts meets: the programs
reject a plain packet that fails them without running the expression, and run
the expression on everything else. Only rejects move; what the expression
keeps is decided by the expression alone.

The criteria are read from the classic BPF libpcap compiled, not from the
expression's text, so libpcap's grammar (`or`, `not`, parentheses, qualifiers
a bare value inherits, `vlan`...) is libpcap's business. Every way through
the program to an accepting return is followed, for each way a packet step 2a
judges can look to the expression:

    ethernet   IPv4 or IPv6 right after the Ethernet header
    tagged     the same with a VLAN tag the kernel kept in the sk_buff put
               back (the expression sees it, step 2a reads the IP header)
    raw        the IP header first (the program compiled for raw IP)

A branch is left out only where its test cannot hold for such a packet: the
ethertype, the IP version in a raw view, an IPv6 extension header as next
header, a later IPv4 fragment. What an accepting way's tests pin down (each an
equality) is read as step 2a reads the packet: the protocol, an address or a
prefix of it, a TCP or UDP port. The criteria are what every accepting way of
every view has in common (addresses: their common prefix; a port or address
either way round: `port`, `host`). A test this does not read (a byte test,
`len`, a range, a MAC address) pins nothing down and leaves its branches in:
the criteria get weaker, never wrong. (Assumed, as the programs do elsewhere:
an sk_buff's protocol is the one its bytes say.)
"""

from __future__ import annotations

import functools
import ipaddress
import sys
from dataclasses import dataclass, field

from vnet.trace.filters import PROTOCOLS as IP_PROTOCOLS

from .ebpf import JA, JEQ, JGE, JGT, JSET, SIZE_BYTES, X
from .expression import ETHERNET, RAW, Expression, compile
from .translate import (C_ABS, C_ALU, C_IMM, C_IND, C_JMP, C_LD, C_LDX, C_MEM, C_MISC, C_MSH, C_RET, C_ST,
                        C_STX)

PROTOCOLS = {name: IP_PROTOCOLS[name] for name in ("tcp", "udp", "sctp", "icmp", "icmp6")}
READS_PORTS = (6, 17)  # the protocols whose ports step 2a reads
SCTP = 132
# For an expression no plain IP packet can pass (`arp`, `not ip and not ip6`, `mpls`): a protocol
# IANA reserves, so step 2a rejects every plain packet; one that has it goes to the expression.
NO_PLAIN_PACKET = {"f_l4_proto": 255}
ETHERTYPE = {4: 0x0800, 6: 0x86DD}
WIDTH = {4: 32, 6: 128}  # address bits
VLAN_TPIDS = frozenset({0x8100, 0x88A8})  # what the kernel keeps in skb->vlan_proto
IPV6_NOT_PLAIN = frozenset({0, 43, 44, 60, 51})  # next headers step 2a leaves to the parse
PORT_KEYS = ("f_sport", "f_dport", "f_port", "f_ports", "f_not_ports")  # with any, step 2a leaves SCTP alone
TCP_OR_UDP_KEYS = PORT_KEYS[:4]  # ... these a packet passes only with ports step 2a reads: TCP or UDP
SET_SLOTS = 4  # f_ports[4], f_l4_protos[4], f_hosts_v4[4], f_hosts_v6[4 * 16], f_not_ports[4], f_not_hosts_v4[4]
WHOLE = 0xFFFFFFFF  # a whole 32-bit word's mask: an IPv4 address, a quarter of an IPv6 one
MAX_STATES = 30000  # states followed in all before giving up (nothing derived): ~0.2 s here



@dataclass(frozen=True)
class _View:
    link: str
    ip: int       # where the IP header starts in what the expression sees
    tagged: bool


VIEWS = (_View(ETHERNET, 14, False), _View(ETHERNET, 18, True), _View(RAW, 0, False))


class _GiveUp(Exception):
    pass


# Symbolic values of A, X and M[]: ("const", v), ("abs", size, off), ("ind", size, msh_off, k) for
# [x + k] with X = 4*([msh_off]&0xf), ("msh", off), ("and", value, mask), UNKNOWN.
ZERO = ("const", 0)  # A, X and M[] start at 0
UNKNOWN = ("unknown",)  # a value nothing is known of (never compared to another: one symbol does)
ACCEPT, REJECT = -1, -2  # where a return leads


@dataclass
class _Way:
    """The equalities one way through the program pinned down, per field."""

    eq: dict = field(default_factory=dict)   # field -> value (a word: (mask, value) pairs)
    ne: dict = field(default_factory=dict)   # field -> values it is not

    def key(self) -> tuple:
        return (tuple(sorted(self.eq.items(), key=repr)),
                tuple(sorted(((k, tuple(sorted(v))) for k, v in self.ne.items()), key=repr)))


def _field(view: _View, family: int, sym):
    """What `sym` is to step 2a, in a packet it judges seen in `view`: ("set", values)
    where the view and family fix it, ("field", name) for proto, sport, dport and
    frag (IPv4's fragment field), ("word", side, i) for a 32-bit word of an
    address, ("masked", (side, i), mask) for one masked; None for anything else."""
    ip = view.ip
    kind = sym[0]
    if kind == "const":
        return ("set", frozenset({sym[1]}))
    if kind == "and":
        inner, mask = _field(view, family, sym[1]), sym[2]
        if inner is None:
            if view.link == RAW and sym[1] == ("abs", 1, 0) and not mask & ~0xF0:
                return ("set", frozenset({(family << 4) & mask}))  # the IP version, as the raw program tests it
            return None
        if inner[0] == "set":
            return ("set", frozenset(v & mask for v in inner[1]))
        if inner[0] == "word":
            return ("masked", inner[1:], mask)
        if inner == ("field", "frag") and not mask & ~0x1FFF:
            return ("set", frozenset({0}))  # the fragment offset of a packet step 2a judges
        return None
    if kind == "abs":
        size, off = sym[1], sym[2]
        if view.link == ETHERNET and (size, off) == (2, 12):
            return ("set", VLAN_TPIDS if view.tagged else frozenset({ETHERTYPE[family]}))
        if view.tagged and (size, off) == (2, 16):
            return ("set", frozenset({ETHERTYPE[family]}))
        rel = off - ip
        if family == 4:
            return {(1, 9): ("field", "proto"), (2, 6): ("field", "frag"),
                    (4, 12): ("word", "src", 0), (4, 16): ("word", "dst", 0)}.get((size, rel))
        if (size, rel) == (1, 6):
            return ("field", "proto")
        if (size, rel) in ((2, 40), (2, 42)):
            return ("field", "sport" if rel == 40 else "dport")
        if size == 4 and 8 <= rel < 40 and rel % 4 == 0:
            return ("word", "src", (rel - 8) // 4) if rel < 24 else ("word", "dst", (rel - 24) // 4)
        return None
    if kind == "ind" and family == 4 and sym[1] == 2 and sym[2] == ip and sym[3] in (ip, ip + 2):
        return ("field", "sport" if sym[3] == ip else "dport")  # [x + k], x the IPv4 header's length
    return None


def _test(op: int, value: int, k: int) -> bool:
    if op == JEQ:
        return value == k
    if op == JGT:
        return value > k
    if op == JGE:
        return value >= k
    return bool(value & k)


def _branches(view: _View, family: int, way: _Way, a, op: int, k: int) -> list[tuple[bool, _Way]]:
    """The outcomes of `A op k` a judged packet can take, each with the way it continues."""
    f = _field(view, family, a)
    if f is None:
        return [(True, way), (False, way)]
    if f[0] == "set":
        return [(t, way) for t in (True, False) if any(_test(op, v, k) == t for v in f[1])]
    if f == ("field", "frag") and op == JSET and k and not k & ~0x1FFF:
        return [(False, way)]  # not a later fragment
    if op != JEQ:
        return [(True, way), (False, way)]
    if f[0] in ("word", "masked"):
        key, mask = (f[1:], WHOLE) if f[0] == "word" else (f[1], f[2])
        tests = way.eq.get(key, ())
        whole = [v for m, v in tests if m == WHOLE]
        if whole:  # the word is known: so is the outcome
            return [((whole[0] & mask) == k, way)]
        if (mask, k) in tests:
            return [(True, way)]
        if family == 6:
            return [(True, _Way({**way.eq, key: tests + ((mask, k),)}, way.ne)), (False, way)]
        # an IPv4 address or prefix: what it is not, too (`not host 10.0.0.5`, `not net 10.0.0.0/8`)
        if (mask, k) in way.ne.get(key, ()):
            return [(False, way)]
        return [(True, _Way({**way.eq, key: tests + ((mask, k),)}, way.ne)),
                (False, _Way(way.eq, {**way.ne, key: way.ne.get(key, frozenset()) | {(mask, k)}}))]
    name = f[1]
    if name == "frag":
        return [(True, way), (False, way)]
    if family == 6 and name == "proto" and k in IPV6_NOT_PLAIN:
        return [(False, way)]  # step 2a leaves extension headers to the parse
    pinned, out = way.eq.get(name), []
    if pinned is None:
        if k not in way.ne.get(name, ()):
            out.append((True, _Way({**way.eq, name: k}, way.ne)))
        out.append((False, _Way(way.eq, {**way.ne, name: way.ne.get(name, frozenset()) | {k}})))
    else:
        out.append((pinned == k, way))
    return out


def _accepting_ways(insns, view: _View, family: int, budget: list[int]) -> list[_Way]:
    """Every way through `insns` to an accepting return a packet step 2a judges
    (in `view`, of `family`) can take. Jumps go forward only, so the states
    at each instruction are all known once those before it are done; equal
    ones are followed once (a chain of `host` tests would be exponential).
    `budget`: states left to follow, shared by all views."""
    out: dict = {}
    states: dict[int, dict] = {0: {None: (ZERO, ZERO, (ZERO,) * 16, _Way())}}
    for pc in range(len(insns)):
        for a, x, mem, way in states.pop(pc, {}).values():
            for nxt, state in _step(insns[pc], pc, a, x, mem, way, view, family):
                budget[0] -= 1
                if budget[0] < 0:
                    raise _GiveUp
                if nxt == ACCEPT:
                    out[way.key()] = way
                elif nxt != REJECT:
                    states.setdefault(nxt, {})[(state[0], state[1], state[2], state[3].key())] = state
    return list(out.values())


def _step(i, pc: int, a, x, mem, way: _Way, view: _View, family: int):
    """The successors of one instruction: (next pc, ACCEPT or REJECT, (a, x, mem, way))."""
    cls, code = i.code & 0x07, i.code
    if cls == C_RET:
        if (code & 0x18) == 0x10:  # ret A
            return [(REJECT if a == ZERO else ACCEPT, (a, x, mem, way))]
        return [(ACCEPT if i.k else REJECT, (a, x, mem, way))]
    if cls == C_JMP:
        op = code & 0xF0
        if op == JA:
            return [(pc + 1 + i.k, (a, x, mem, way))]
        if code & X and x[0] != "const":
            return [(pc + 1 + j, (a, x, mem, way)) for j in {i.jt, i.jf}]
        k = x[1] if code & X else i.k
        return [(pc + 1 + (i.jt if taken else i.jf), (a, x, mem, w))
                for taken, w in _branches(view, family, way, a, op, k)]
    if cls == C_LD:
        mode = code & 0xE0
        if mode == C_IMM:
            a = ("const", i.k)
        elif mode == C_ABS:
            a = ("abs", SIZE_BYTES[code & 0x18], i.k) if i.k < 0xFFFFF000 else UNKNOWN
        elif mode == C_IND:
            size = SIZE_BYTES[code & 0x18]
            a = (("abs", size, (x[1] + i.k) & 0xFFFFFFFF) if x[0] == "const"
                 else ("ind", size, x[1], i.k) if x[0] == "msh" else UNKNOWN)
        elif mode == C_MEM:
            a = mem[i.k]
        else:
            a = UNKNOWN  # len
    elif cls == C_LDX:
        mode = code & 0xE0
        x = (("const", i.k) if mode == C_IMM else mem[i.k] if mode == C_MEM
             else ("msh", i.k) if mode == C_MSH else UNKNOWN)
    elif cls == C_ST:
        mem = mem[:i.k] + (a,) + mem[i.k + 1:]
    elif cls == C_STX:
        mem = mem[:i.k] + (x,) + mem[i.k + 1:]
    elif cls == C_ALU:
        if code & 0xF0 == 0x50 and not code & X:  # and #k
            a = (("const", a[1] & i.k) if a[0] == "const" else ("and", a[1], a[2] & i.k) if a[0] == "and"
                 else ("and", a, i.k))
        else:
            a = UNKNOWN
    elif cls == C_MISC:
        if code & 0xF8 == 0x80:
            a = x  # txa
        else:
            x = a  # tax
    return [(pc + 1, (a, x, mem, way))]


@dataclass
class _Pinned:
    """What one accepting way says in step 2a's terms."""

    family: int
    proto: int | None = None
    sport: int | None = None
    dport: int | None = None
    src: tuple[int, int] | None = None   # (address as an int of the family's width, prefix length)
    dst: tuple[int, int] | None = None
    not_ports: frozenset | None = None   # a TCP or UDP packet's ports are neither of these; None: not TCP or UDP
    not_hosts: frozenset = frozenset()   # an IPv4 packet's addresses are in none of these (mask, value) prefixes
    tagged: bool = False                 # seen with the tag the kernel keeps in the sk_buff put back


def _address(words, family: int) -> tuple[int, int] | None:
    """The prefix a way's word tests pin down: whole words from the first, then one masked word."""
    nwords = 1 if family == 4 else 4
    addr, bits = 0, 0
    for i in range(nwords):
        tests = words.get(i, ())
        full = [v for m, v in tests if m == WHOLE]
        prefix = [(m, v) for m, v in tests if m not in (0, WHOLE) and m == _mask(bin(m).count("1"))]
        if full:
            addr |= full[0] << (32 * (nwords - 1 - i))
            bits += 32
            continue
        if prefix:
            m, v = max(prefix)
            addr |= (v & m) << (32 * (nwords - 1 - i))
            bits += bin(m).count("1")
        break
    return (addr, bits) if bits else None


def _pinned(way: _Way, family: int) -> _Pinned | None:
    """None where the way's equalities contradict each other (a packet cannot take it)."""
    p = _Pinned(family)
    p.proto = way.eq.get("proto")
    for side in ("src", "dst"):
        words: dict[int, tuple] = {}
        for key, tests in way.eq.items():
            if isinstance(key, tuple) and key[0] == side:  # (side, word index)
                for m, v in tests:
                    if v & ~m:
                        return None  # a masked word equal to bits the mask clears
                words[key[1]] = tests
        for i, tests in words.items():
            full = {v for m, v in tests if m == WHOLE}
            if len(full) > 1 or any((f & m) != v for f in full for m, v in tests):
                return None
        setattr(p, side, _address(words, family))
    if p.proto in READS_PORTS:
        p.sport, p.dport = way.eq.get("sport"), way.eq.get("dport")
    if p.proto in READS_PORTS or (p.proto is None and not set(READS_PORTS) <= way.ne.get("proto", frozenset())):
        # (a port read with the protocol unknown is still the port of a TCP or UDP packet)
        p.not_ports = way.ne.get("sport", frozenset()) & way.ne.get("dport", frozenset())
    if family == 4:
        p.not_hosts = way.ne.get(("src", 0), frozenset()) & way.ne.get(("dst", 0), frozenset())
    return p


def _common_prefix(a: tuple[int, int], b: tuple[int, int], width: int) -> tuple[int, int]:
    bits = min(a[1], b[1])
    diff = (a[0] ^ b[0]) >> (width - bits) if bits else 0
    bits -= diff.bit_length()
    return (a[0] >> (width - bits) << (width - bits) if bits else 0, bits)


def _join(ways: list[_Pinned], sets: bool, exclusions: bool = True) -> dict:
    """What all of `ways` have in common, as struct vnet_filter fields (`sets`: or
    one of up to SET_SLOTS protocols, ports or addresses of each family, either way round;
    `exclusions`: and ports and IPv4 addresses none of them has)."""
    if not ways:
        return {}
    cfg: dict = {}
    families = {w.family for w in ways}
    family = families.pop() if len(families) == 1 else None
    if family:
        cfg["f_family"] = family
    protos = {w.proto for w in ways}
    if len(protos) == 1 and None not in protos:
        cfg["f_l4_proto"] = protos.pop()
    elif sets and None not in protos and len(protos) <= SET_SLOTS:
        cfg["f_l4_protos"] = bytes(_slots(sorted(protos)))  # `tcp or udp` (a __u8 array)
    for key in ("sport", "dport"):
        values = {getattr(w, key) for w in ways}
        if len(values) == 1 and None not in values:
            cfg[f"f_{key}"] = values.pop()
    if "f_sport" not in cfg and "f_dport" not in cfg:
        either = set.intersection(*({w.sport, w.dport} - {None} for w in ways))
        if either:
            cfg["f_port"] = min(either)
        elif sets:
            ports = _hitting_set([{w.sport, w.dport} - {None} for w in ways])  # `port 80 or port 443`
            if ports:
                cfg["f_ports"] = _slots(sorted(ports))
    if sets and exclusions:
        # (step 2a leaves a packet with its tag in the sk_buff to the expression: 802.1Q to it)
        ports = _ruled_out([w.not_ports for w in ways if w.not_ports is not None and not w.tagged])
        if ports:  # `not port 22`: any of them, either way round, leaves a TCP or UDP packet out
            cfg["f_not_ports"] = _slots(ports)
        hosts = _ruled_out([w.not_hosts for w in ways if w.family == 4 and not w.tagged], _outermost)
        if hosts:  # `not host 10.0.0.5`, `not net 10.0.0.0/8`: ... an IPv4 packet from or to one of them
            cfg["f_not_hosts_v4"] = _slots([_as_loaded(v) for _, v in hosts])
            cfg["f_not_hosts_v4_mask"] = _slots([_as_loaded(m) for m, _ in hosts])
    if set(cfg.get("f_l4_protos", ())) - {0} <= set(READS_PORTS) and any(k in cfg for k in TCP_OR_UDP_KEYS):
        cfg.pop("f_l4_protos", None)  # only TCP and UDP packets have the ports step 2a reads
    if family:
        width = WIDTH[family]
        for key in ("src", "dst"):
            prefixes = [getattr(w, key) for w in ways]
            if None not in prefixes:
                common = prefixes[0]
                for p in prefixes[1:]:
                    common = _common_prefix(common, p, width)
                if common[1]:
                    cfg[f"f_{key}"] = common
        if "f_src" not in cfg and "f_dst" not in cfg:
            host = _either_prefix(ways, width)
            if host:
                cfg["f_host"] = host
        if sets and not any(cfg.get(k, (0, 0))[1] == width for k in ("f_src", "f_dst", "f_host")):
            hosts = _host_sets(ways)
            # `host A or host B`, `net A or net B`: the set says more than their common prefix
            # (one prefix alone says what f_host does)
            if hosts and (family == 6 or hosts["f_hosts_v4"][1] or hosts["f_hosts_v4_mask"][0] == WHOLE):
                cfg.pop("f_host", None)
                cfg.update(hosts)
        for key in ("f_src", "f_dst", "f_host"):
            if key in cfg:
                addr, bits = cfg[key]
                packed = addr.to_bytes(width // 8, "big").ljust(16, b"\0")
                cfg[key], cfg[f"{key}_bits"] = packed, bits
    elif sets:
        cfg.update(_host_sets(ways))  # `host 10.0.0.1 or host fd00::1`: a dual-stack host
    return cfg


def _host_sets(ways: list[_Pinned]) -> dict:
    """f_hosts_v4 (with f_hosts_v4_mask) and f_hosts_v6 where each way pins an address down,
    either way round (IPv4: or a prefix, `net 10.0.0.0/8 or net 192.168.0.0/16`): per family,
    at most SET_SLOTS of them, one of each way's among them. A family no way has gets none
    (step 2a rejects it then). {} where a way pins none (0: an unused slot)."""
    out: dict = {}
    for family in (4, 6):
        options = [{p for p in (w.src, w.dst) if p and (family == 4 or p[1] == WIDTH[family]) and p[0]}
                   for w in ways if w.family == family]
        if not options:
            continue
        hosts = _hitting_set(options)
        if not hosts:
            return {}
        if family == 4:
            prefixes = _outermost({(_mask(bits), addr) for addr, bits in hosts})
            out["f_hosts_v4"] = _slots([_as_loaded(v) for _, v in prefixes])
            out["f_hosts_v4_mask"] = _slots([_as_loaded(m) for m, _ in prefixes])
        else:
            out["f_hosts_v6"] = b"".join(a.to_bytes(16, "big") for a, _ in sorted(hosts)).ljust(16 * SET_SLOTS, b"\0")
    return out


def _ruled_out(per_way: list[frozenset], keep=sorted) -> list:
    """Up to SET_SLOTS values every way rules out (0, an unused slot, never): an exclusion.
    `keep`: which of them say something (IPv4 prefixes: _outermost)."""
    common = frozenset.intersection(*per_way) - {0} if per_way else frozenset()
    return keep(common)[:SET_SLOTS]


def _mask(bits: int) -> int:
    """An IPv4 prefix length's mask, as a 32-bit word in network order."""
    return (WHOLE << (32 - bits)) & WHOLE


def _outermost(prefixes) -> list[tuple[int, int]]:
    """IPv4 (mask, value) prefixes without those inside another of them (10.1.0.0/16 in
    10.0.0.0/8 says nothing more) nor value 0 (an unused slot), in order."""
    return sorted((m, v) for m, v in prefixes if v and not any(
        (m2, v2) != (m, v) and m2 & m == m2 and v & m2 == v2 for m2, v2 in prefixes))


def _hitting_set(options: list[set[int]]) -> set[int] | None:
    """At most SET_SLOTS values, one of each of `options` among them (greedy: the value most
    of the rest have first); None where a way has none or more would be needed."""
    if not all(options):
        return None
    chosen: set[int] = set()
    left = list(options)
    while left:
        if len(chosen) == SET_SLOTS:
            return None
        counts: dict[int, int] = {}
        for o in left:
            for v in o:
                counts[v] = counts.get(v, 0) + 1
        best = min(counts, key=lambda v: (-counts[v], v))
        chosen.add(best)
        left = [o for o in left if best not in o]
    return chosen


def _as_loaded(addr: int) -> int:
    """An IPv4 address as the programs load its 4 bytes from the packet (a native-order word)."""
    return int.from_bytes(addr.to_bytes(4, "big"), sys.byteorder)


def _slots(values: list[int]) -> tuple[int, ...]:
    """A set's slots as the programs read them: unused ones are 0."""
    return tuple(values) + (0,) * (SET_SLOTS - len(values))


def _either_prefix(ways: list[_Pinned], width: int) -> tuple[int, int] | None:
    """The longest prefix that the source or the destination of every way has."""
    best = None
    for start in (ways[0].src, ways[0].dst):
        if start is None:
            continue
        common = start
        for w in ways[1:]:
            options = [_common_prefix(common, p, width) for p in (w.src, w.dst) if p is not None]
            if not options:
                common = (0, 0)
                break
            common = max(options, key=lambda p: p[1])
        if common[1] and (best is None or common[1] > best[1]):
            best = common
    return best


def criteria(expression: Expression | str, sctp_ports_later: bool = True, sets: bool = True,
             exclusions: bool = True) -> dict:
    """struct vnet_filter fields (f_l4_proto, f_family, f_src/f_dst/f_host and
    their _bits, f_sport/f_dport/f_port, f_l4_protos, f_ports, f_hosts_v4 (and _mask), f_hosts_v6,
    f_not_ports, f_not_hosts_v4 (and _mask)) every
    packet step 2a judges and `expression` accepts meets; {} where nothing is pinned down.
    `sctp_ports_later`: step 2a leaves SCTP packets alone where ports are
    criteria (VNET_PLAIN_SCTP_PORTS_LATER); `sets`: it has f_l4_protos,
    f_ports and f_hosts_v4 (not in objects of an older vnet; see within()); `exclusions`:
    f_not_ports and f_not_hosts_v4 too (left out at tc, where the expression tests them
    for less, see docs/benchmarks.md)."""
    expr = compile(expression) if isinstance(expression, str) else expression
    return dict(_derived(expr, sctp_ports_later, sets, exclusions))


@functools.lru_cache(maxsize=16)
def _derived(expr: Expression, sctp_ports_later: bool, sets: bool, exclusions: bool) -> dict:
    """criteria(), once per expression: the CLI's check and the trace ask alike."""
    ways: list[_Pinned] = []
    budget = [MAX_STATES]
    try:
        for view in VIEWS:
            insns = expr.classic(view.link)
            if insns is None:
                continue  # no raw program: hooks that see L3 only reject every packet
            for family in (4, 6):
                for way in _accepting_ways(insns, view, family, budget):
                    p = _pinned(way, family)
                    if p is not None:
                        p.tagged = view.tagged
                        ways.append(p)
    except _GiveUp:
        return {}
    if not ways:
        return dict(NO_PLAIN_PACKET)
    if sctp_ports_later:
        # libpcap's `port 53` is TCP's, UDP's or SCTP's; step 2a reads no SCTP ports, but
        # judges no SCTP packet either where ports are criteria: its ways can be left out then
        other = _join([w for w in ways if w.proto != SCTP], sets, exclusions)
        if any(k in other for k in PORT_KEYS):
            return other
    return _join(ways, sets, exclusions)


def within(cfg: dict, fields: set[str]) -> dict:
    """`cfg` for an object whose struct vnet_filter has only `fields` (an older vnet's): any
    criterion left out, the rest still rejects only what the expression rejects. Two
    exceptions: an object without f_hosts_v6 reads an IPv4 set as rejecting every IPv6
    packet, so the IPv4 set goes with it; one without the _mask fields reads a set of IPv4
    prefixes as whole addresses, so such a set goes (an address set without its IPv6 half
    would reject every IPv4 packet: both halves)."""
    out = {k: v for k, v in cfg.items() if k in fields}
    if "f_hosts_v6" in cfg and "f_hosts_v6" not in fields:
        out.pop("f_hosts_v4", None)
    for key in ("f_hosts_v4", "f_not_hosts_v4"):
        masks = cfg.get(f"{key}_mask")
        if masks and f"{key}_mask" not in fields and any(m != WHOLE for v, m in zip(cfg[key], masks) if v):
            out.pop(key, None)
            if key == "f_hosts_v4":
                out.pop("f_hosts_v6", None)
        if key not in out:
            out.pop(f"{key}_mask", None)  # (of a set that went)
    return out


def describe(cfg: dict) -> str:
    """The criteria in words, for --dump-filter."""
    if cfg == NO_PLAIN_PACKET:
        return "no plain IP packet (protocol 255, which IANA reserves, is left to the expression)"
    parts = []
    if cfg.get("f_family"):
        parts.append(f"IPv{cfg['f_family']}")
    names = {v: k for k, v in PROTOCOLS.items()}
    if cfg.get("f_l4_proto"):
        parts.append(f"protocol {names.get(cfg['f_l4_proto'], cfg['f_l4_proto'])}")
    if cfg.get("f_l4_protos"):
        parts.append("protocol " + " or ".join(str(names.get(p, p)) for p in cfg["f_l4_protos"] if p))
    for key, word in (("f_src", "source"), ("f_dst", "destination"), ("f_host", "source or destination")):
        if cfg.get(f"{key}_bits"):
            bits = cfg[f"{key}_bits"]
            family = cfg.get("f_family")
            v4 = family == 4 if family else bits <= 32 and not any(cfg[key][4:])
            addr = ipaddress.ip_address(cfg[key][:4] if v4 else cfg[key])
            parts.append(f"{word} {addr}/{bits}")
    for key, word in (("f_sport", "source port"), ("f_dport", "destination port"),
                      ("f_port", "source or destination port")):
        if cfg.get(key):
            parts.append(f"{word} {cfg[key]}")
    addrs = _v4_prefixes(cfg, "f_hosts_v4")
    six = cfg.get("f_hosts_v6", b"")
    addrs += [ipaddress.ip_address(six[i:i + 16]) for i in range(0, len(six), 16) if any(six[i:i + 16])]
    if addrs:
        parts.append("source or destination " + " or ".join(map(str, addrs)))
    if cfg.get("f_ports"):
        parts.append("source or destination port " + " or ".join(str(p) for p in cfg["f_ports"] if p))
    if cfg.get("f_not_ports"):
        parts.append("no TCP or UDP port " + " or ".join(str(p) for p in cfg["f_not_ports"] if p))
    if cfg.get("f_not_hosts_v4"):
        parts.append("no IPv4 source or destination " + " or ".join(map(str, _v4_prefixes(cfg, "f_not_hosts_v4"))))
    return ", ".join(parts)


def _v4_prefixes(cfg: dict, key: str) -> list:
    """An IPv4 set's used slots as addresses, or networks where their mask is not whole."""
    masks = cfg.get(f"{key}_mask") or (WHOLE,) * SET_SLOTS
    out = []
    for value, mask in zip(cfg.get(key, ()), masks):
        if value:
            addr = ipaddress.ip_address(value.to_bytes(4, sys.byteorder))
            bits = bin(mask).count("1") if mask else 32
            out.append(addr if bits == 32 else ipaddress.ip_network(f"{addr}/{bits}"))
    return out
