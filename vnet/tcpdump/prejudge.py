"""What a tcpdump expression says of a plain packet's tuple, as field-filter
criteria the programs test before the expression (step 2a of
bpf/src/vnet_filter.bpf.h, `f_on` VNET_FILTER_ON_PCAP).

A program reads a plain IPv4/IPv6 packet's protocol, addresses and ports in
~20 ns; the spliced expression costs 10-20 ns more at kernel hooks. For the
common expressions, a conjunction of protocols, hosts, nets and ports, this
module gives criteria every packet the expression accepts meets: the programs
reject a plain packet that fails them without running the expression, and run
the expression on everything else. Only rejects move; what the expression
keeps is decided by the expression alone.

That is sound when each criterion is implied by the expression on the packets
step 2a judges (plain IP: no in-band VLAN tag, no IPv6 extension header, not a
later fragment, the headers in the linear part), which holds for each
primitive below, as pcap-filter(7) and libpcap's code generator define it:

    tcp udp sctp icmp icmp6      the IP protocol (icmp: IPv4 only; icmp6: IPv6 only)
    ip ip6                       the family
    [ip|ip6] [src|dst] host A    an address literal (not a name)
    [ip|ip6] [src|dst] net A/N   a prefix
    [src|dst] A                  host A
    [tcp|udp|sctp] [src|dst] port N   a decimal port; kept only where the
                                 conjunction names TCP or UDP: step 2a reads no
                                 SCTP ports, and libpcap's `port` alone means
                                 TCP, UDP or SCTP

and the conjunctions (`and`, `&&`) of such primitives with anything else: each
conjunct is implied alone, so one this does not read (`not port 53`, a byte
test, a host name, `portrange`) is left out, and so is a criterion that
collides with an earlier one (`port 53 and port 80`): the criteria get weaker,
never wrong. An expression with `or` or parentheses (not a plain conjunction),
or with `vlan`, `mpls`, `pppoes`, `geneve` (they move what the terms after
them read) gives none: the expression alone decides, as before.
"""

from __future__ import annotations

import ipaddress

from vnet.trace.filters import PROTOCOLS as IP_PROTOCOLS

PROTOCOLS = {name: IP_PROTOCOLS[name] for name in ("tcp", "udp", "sctp", "icmp", "icmp6")}
PORTED = ("tcp", "udp", "sctp")
READS_PORTS = (6, 17)  # the protocols whose ports step 2a reads
FAMILIES = {"ip": 4, "ip6": 6}
DIRECTIONS = ("src", "dst")
AND = ("and", "&&")
OR = ("or", "||")
SHIFTING = ("vlan", "mpls", "pppoes", "pppoed", "geneve", "vxlan")  # keywords that move the offsets after them


class _Unsupported(Exception):
    pass


def criteria(text: str) -> dict:
    """struct vnet_filter fields (f_l4_proto, f_family, f_src/f_dst/f_host and
    their _bits, f_sport/f_dport/f_port) implied by expression `text` on plain
    IP packets; {} where nothing is (or the expression is not one this reads)."""
    tokens = text.split()
    # `or` (and parentheses, which may hold one) make it more than a conjunction;
    # `vlan`, `mpls`... move what the terms after them read: the expression alone decides
    if any(t in OR or t in SHIFTING or "(" in t or ")" in t for t in tokens):
        return {}
    cfg: dict = {}
    for chunk in _conjuncts(tokens):
        try:
            term, end = _term(chunk, 0)
            if end != len(chunk):
                raise _Unsupported  # more than one primitive: `net A mask M`, a bare id...
        except _Unsupported:
            continue  # `not port 53`, a byte test, a name...: each conjunct is implied alone
        for key, value in term:
            cfg.setdefault(key, value)  # a collision (tcp and udp, two ports...): the later one is left out
    if cfg.get("f_l4_proto") not in READS_PORTS:
        # libpcap's `port` is TCP's, UDP's or SCTP's; step 2a reads TCP's and UDP's only
        for key in ("f_sport", "f_dport", "f_port"):
            cfg.pop(key, None)
    for key in ("f_src", "f_dst", "f_host"):
        if key in cfg:
            cfg[key], cfg[f"{key}_bits"] = cfg[key]  # (address, prefix length): one criterion
    return cfg


def _conjuncts(tokens: list[str]) -> list[list[str]]:
    """The terms between top-level `and`s (without `or`, `and` joins terms at the top level)."""
    chunks: list[list[str]] = [[]]
    for t in tokens:
        if t in AND:
            chunks.append([])
        else:
            chunks[-1].append(t)
    return [c for c in chunks if c]


def _reader(tokens: list[str]):
    """tokens[k], or None past the end."""
    return lambda k: tokens[k] if k < len(tokens) else None


def _term(tokens: list[str], i: int) -> tuple[list[tuple[str, object]], int]:
    """One primitive at tokens[i]: its criteria and the index after it."""
    at = _reader(tokens)
    out: list[tuple[str, object]] = []
    tok = at(i)
    if tok in PROTOCOLS:
        proto = PROTOCOLS[tok]
        out.append(("f_l4_proto", proto))
        if tok == "icmp":
            out.append(("f_family", 4))
        elif tok == "icmp6":
            out.append(("f_family", 6))
        i += 1
        if tok in PORTED and (at(i) == "port" or (at(i) in DIRECTIONS and at(i + 1) == "port")):
            return out + _port(tokens, i), _after_port(tokens, i)
        return out, i
    if tok in FAMILIES:
        out.append(("f_family", FAMILIES[tok]))
        i += 1
        if at(i) is None:
            return out, i
        crit, i = _address(tokens, i)
        return out + crit, i
    if tok == "port" or (tok in DIRECTIONS and at(i + 1) == "port"):
        return _port(tokens, i), _after_port(tokens, i)
    return _address(tokens, i)


def _port(tokens: list[str], i: int) -> list[tuple[str, object]]:
    direction = tokens[i] if tokens[i] in DIRECTIONS else None
    j = i + (2 if direction else 1)
    number = tokens[j] if j < len(tokens) else ""
    if not number.isdecimal() or not 0 < int(number) < 65536:
        raise _Unsupported  # a service name, a range, hex: libpcap's business
    key = {"src": "f_sport", "dst": "f_dport", None: "f_port"}[direction]
    return [(key, int(number))]


def _after_port(tokens: list[str], i: int) -> int:
    return i + (3 if tokens[i] in DIRECTIONS else 2)


def _address(tokens: list[str], i: int) -> tuple[list[tuple[str, object]], int]:
    """[src|dst] host A, [src|dst] net A/N, or src|dst A."""
    at = _reader(tokens)
    direction = at(i) if at(i) in DIRECTIONS else None
    if direction:
        i += 1
    kind = at(i) if at(i) in ("host", "net") else None
    if kind:
        i += 1
    elif not direction:
        raise _Unsupported
    text = at(i) or ""
    try:
        if kind == "net":
            if "/" not in text:
                raise _Unsupported  # `net 10.9` or with `mask`: libpcap's own rules
            net = ipaddress.ip_network(text, strict=True)
        else:
            net = ipaddress.ip_network(ipaddress.ip_address(text))
    except ValueError:
        raise _Unsupported from None  # a host name, a partial address: libpcap resolves those
    key = {"src": "f_src", "dst": "f_dst", None: "f_host"}[direction]
    out: list[tuple[str, object]] = [("f_family", net.version)]
    if net.prefixlen:
        out.append((key, (net.network_address.packed.ljust(16, b"\0"), net.prefixlen)))
    return out, i + 1


def describe(cfg: dict) -> str:
    """The criteria in words, for --dump-filter."""
    parts = []
    if cfg.get("f_family"):
        parts.append(f"IPv{cfg['f_family']}")
    if cfg.get("f_l4_proto"):
        names = {v: k for k, v in PROTOCOLS.items()}
        parts.append(f"protocol {names.get(cfg['f_l4_proto'], cfg['f_l4_proto'])}")
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
    return ", ".join(parts)
