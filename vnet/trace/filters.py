"""The in-kernel packet filter: what the user asked for, checked here, written
into every packet program's `filter` config (struct vnet_filter) before load."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import cached_property

from vnet.errors import UsageError

PROTOCOLS = {"icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "gre": 47, "esp": 50, "icmp6": 58, "sctp": 132}
FAMILIES = {"ip": 4, "ip4": 4, "ipv4": 4, "ip6": 6, "ipv6": 6}
TUPLE_FIELDS = ("proto", "src", "dst", "host", "sport", "dport", "port")  # what step 2a tests
# f_on (enum vnet_filter_on, bpf/src/vnet_event.h; tests/unit/test_btf_layout.py checks the values)
FILTER_ON, FILTER_ON_PCAP = 1, 2
# enum vnet_plain_test: step 2a leaves SCTP packets to the rest where ports are criteria
PLAIN_SCTP_PORTS_LATER = 1


@dataclass(frozen=True)
class PacketFilter:
    proto: str | None = None    # udp, tcp, icmp, icmp6, a number, or ip/ip6 for the family only
    src: str | None = None      # address or CIDR prefix
    dst: str | None = None
    host: str | None = None     # source or destination
    sport: int | None = None
    dport: int | None = None
    port: int | None = None     # source or destination
    len_min: int | None = None
    len_max: int | None = None
    sample: str | None = None   # "1/N"
    netns: str | None = None    # packets on devices of this network namespace (`ip netns` name)
    ifaces: tuple[str, ...] | None = None  # packets on these devices (of `netns`, or vnet's own), at most 4
    outer: bool | None = None   # VXLAN: see (identify, filter) the outer packet instead of the inner one
    expression: str | None = None  # tcpdump syntax, run on the packet's bytes before anything else

    @cached_property
    def compiled(self):
        """The tcpdump expression compiled by libpcap (None without one); a bad one is a UsageError."""
        if self.expression is None:
            return None
        from vnet.tcpdump import compile

        return compile(self.expression)

    def _criteria(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @property
    def active(self) -> bool:
        return any(v is not None for v in self._criteria().values())

    def config(self, prejudge: bool = True, sctp_ports_later: bool = True, sets: bool = True,
               exclusions: bool = True) -> dict:
        """The f_* fields of struct vnet_filter (names from the objects' BTF);
        `prejudge`: with the criteria a lone expression implies, tested first
        (`sctp_ports_later`: by objects with VNET_PLAIN_SCTP_PORTS_LATER; `sets`:
        by objects with f_ports and f_l4_protos; `exclusions`: f_not_ports and
        f_not_hosts_v4 among them)."""
        if not self.active:
            return {"f_on": 0}
        cfg: dict = {"f_on": FILTER_ON}
        if self.expression is not None:
            self.compiled  # noqa: B018 -- a bad expression fails here, before anything loads
            cfg["f_pcap"] = 1
        if self.outer:
            cfg["f_outer"] = 1
        if not any(v is not None for k, v in self._criteria().items() if k not in ("outer", "expression")):
            cfg["f_on"] = 0  # only the view changes, or the expression decides: no field to match
        if prejudge and self.expression is not None and all(getattr(self, k) is None for k in TUPLE_FIELDS):
            # What every packet the expression accepts has (protocol, addresses, ports), tested first.
            from vnet.tcpdump.prejudge import criteria

            pre = criteria(self.compiled, sctp_ports_later, sets, exclusions)
            if pre:
                cfg.update(pre, f_on=FILTER_ON_PCAP)
        families = set()
        if self.proto is not None:
            p = self.proto.lower()
            if p in FAMILIES:
                families.add(FAMILIES[p])
            elif p in PROTOCOLS:
                cfg["f_l4_proto"] = PROTOCOLS[p]
            elif p.isdigit() and 0 < int(p) < 256:
                cfg["f_l4_proto"] = int(p)
            else:
                raise UsageError(f"unknown protocol {self.proto!r} (use {', '.join(PROTOCOLS)}, ip, ip6 or a number)")
            if cfg.get("f_l4_proto") == 1:
                families.add(4)
            if cfg.get("f_l4_proto") == 58:
                families.add(6)
        for name in ("src", "dst", "host"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                raise UsageError(f"--{name} {value!r} is not an address or prefix") from None
            families.add(net.version)
            cfg[f"f_{name}"] = net.network_address.packed.ljust(16, b"\0")
            cfg[f"f_{name}_bits"] = net.prefixlen
            if net.prefixlen == 0:  # /0 matches everything of that family
                cfg.pop(f"f_{name}"), cfg.pop(f"f_{name}_bits")
        if len(families) > 1:
            raise UsageError("the filter mixes IPv4 and IPv6 (addresses and protocol must agree)")
        if families:
            cfg["f_family"] = families.pop()
        for name in ("sport", "dport", "port"):
            value = getattr(self, name)
            if value is not None:
                if not 0 < value < 65536:
                    raise UsageError(f"--{name} {value} is not a port (1-65535)")
                cfg[f"f_{name}"] = value
        if self.len_min is not None:
            cfg["f_len_min"] = self.len_min
        if self.len_max is not None:
            if self.len_max < (self.len_min or 0) or self.len_max <= 0:
                raise UsageError(f"--max-len {self.len_max} is below --min-len or not positive")
            cfg["f_len_max"] = self.len_max
        if self.sample is not None:
            cfg["f_sample"] = parse_sample(self.sample)
        if self.netns is not None:
            cfg["f_netns"] = _netns_cookie(self.netns)
        if self.ifaces:
            if len(self.ifaces) > 4:
                raise UsageError(f"at most 4 --filter-iface, got {len(self.ifaces)}")
            from vnet.probes.device import resolve

            devices = [resolve(name, self.netns) for name in self.ifaces]
            if len({d.netns for d in devices}) > 1:
                raise UsageError("--filter-iface devices must be in one network namespace")
            indexes = [d.ifindex for d in devices]
            cfg["f_ifindex"] = tuple(indexes + [0] * (4 - len(indexes)))
            # An ifindex only means something within its namespace.
            cfg["f_netns"] = devices[0].netns_cookie or _netns_cookie(devices[0].netns)
        return cfg


def _netns_cookie(name: str | None) -> int:
    from vnet import netns

    cookie = netns.cookie(name)
    if not cookie:
        raise UsageError("filtering by network namespace needs Linux >= 5.14 (netns cookies)")
    return cookie


def parse_sample(text: str) -> int:
    """'1/N' (or 'N') -> N: keep the packets whose pkt_id is 0 mod N, at every hook and host."""
    head, _, tail = text.partition("/")
    try:
        n = int(tail if tail else head)
        ok = (head.strip() == "1" if tail else True) and n >= 1
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(f"--sample {text!r}: use 1/N with N >= 1")
    return n
