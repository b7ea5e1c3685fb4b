"""The field filter's criteria (bpf/src/vnet_filter.bpf.h, VNET_FILTER_TUPLE_OR_RETURN) as a
model on a packet's fields. The programs reach those fields two ways: read first where the
packet is plain (vnet_filter_*_may_keep), else from the parse; the tests hold a filtered load
to the model applied to an unfiltered load's events, which come from the parse."""

from __future__ import annotations

import ipaddress

from vnet.trace.records import L4_NAMES

L4_NUMBERS = {name: number for number, name in L4_NAMES.items()}


def keeps(cfg: dict, family: int, l4_proto: int, ports: tuple[int, int] | None, saddr: bytes, daddr: bytes) -> bool:
    """`cfg`: PacketFilter.config(); `ports`: (sport, dport) where the packet has them (VNET_F_PORTS);
    addresses as the event holds them (16 bytes, IPv4 in the first 4, zeros without an IP header)."""

    def prefix(addr: bytes, name: str) -> bool:
        bits = cfg.get(f"f_{name}_bits", 0)
        want = bytes(cfg.get(f"f_{name}", b"\0" * 16))
        return int.from_bytes(addr, "big") >> (128 - bits) == int.from_bytes(want, "big") >> (128 - bits)

    if cfg.get("f_family") and cfg["f_family"] != family:
        return False
    if cfg.get("f_l4_proto") and l4_proto != cfg["f_l4_proto"]:
        return False
    for key, ok in (("f_sport", lambda p: ports[0] == p), ("f_dport", lambda p: ports[1] == p),
                    ("f_port", lambda p: p in ports)):
        if cfg.get(key) and (ports is None or not ok(cfg[key])):
            return False
    if cfg.get("f_src_bits") and not prefix(saddr, "src"):
        return False
    if cfg.get("f_dst_bits") and not prefix(daddr, "dst"):
        return False
    return not (cfg.get("f_host_bits") and not (prefix(saddr, "host") or prefix(daddr, "host")))


def keeps_event(cfg: dict, e: dict) -> bool:
    """The model on an event as vnet.trace decodes it."""
    family = e.get("ip_version", 0)
    l4 = (L4_NUMBERS.get(e["proto"]) or int(e["proto"])) if family else 0

    def packed(addr: str | None) -> bytes:
        return ipaddress.ip_address(addr).packed.ljust(16, b"\0") if addr else bytes(16)

    ports = (e["sport"], e["dport"]) if e["sport"] is not None else None
    return keeps(cfg, family, l4, ports, packed(e["src"]), packed(e["dst"]))
