"""From raw ring-buffer records to events a person or a program reads.

The binary layout comes from the object's BTF (StructLayout); this module only
names things: protocols, addresses, hooks, probes.
"""

from __future__ import annotations

import ipaddress
from vnet.binding import StructLayout

L4_NAMES = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp", 47: "gre", 50: "esp"}
ETH_NAMES = {0x0800: "ipv4", 0x86DD: "ipv6", 0x0806: "arp", 0x8100: "vlan", 0x88CC: "lldp"}
ICMP_NAMES = {(1, 0): "echo reply", (1, 3): "unreachable", (1, 8): "echo request", (1, 11): "time exceeded",
              (58, 1): "unreachable", (58, 2): "packet too big", (58, 3): "time exceeded", (58, 128): "echo request",
              (58, 129): "echo reply", (58, 133): "router solicit", (58, 134): "router advert",
              (58, 135): "neighbor solicit", (58, 136): "neighbor advert", (58, 143): "mldv2 report"}
TCP_FLAG_LETTERS = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"), (0x10, "."), (0x20, "U"), (0x40, "E"),
                    (0x80, "W"))


class EventDecoder:
    """Turns one raw ring record into a JSON-ready dict: a packet event (`struct
    vnet_event`, or `struct vnet_event_more` with the fields few events have) or a
    scheduler event. Files from before vnet_event_more have one packet struct with
    every field."""

    def __init__(self, layout: StructLayout, enums: dict[str, dict[str, int]], labels: dict,
                 wall_offset_ns: int, *, ifnames=None, drop_reasons: dict[int, str] | None = None,
                 sched_layout: StructLayout | None = None, more_layout: StructLayout | None = None):
        self.layout = layout
        kind = layout.field("kind")  # every record starts with the common header
        self._kind_at = slice(kind.offset, kind.offset + kind.size)
        kinds = enums.get("vnet_event_kind", {})
        self._sched_kind = kinds.get("VNET_KIND_SCHED")
        self.sched_layout = sched_layout
        # packet record kind -> (layout, its codec, its field names)
        self._packet = {kinds.get("VNET_KIND_PACKET", 1): (layout, layout.codec(), layout.names)}
        if more_layout is not None and "VNET_KIND_PACKET_MORE" in kinds:
            self._packet[kinds["VNET_KIND_PACKET_MORE"]] = (more_layout, more_layout.codec(), more_layout.names)
        self.names = layout.names
        self.hooks = {v: k.removeprefix("VNET_HOOK_").lower() for k, v in enums["vnet_hook"].items()}
        self.flag = {k.removeprefix("VNET_F_").lower(): v for k, v in enums["vnet_event_flag"].items()}
        # (probe_id, hook value) for device probes, (probe_id, None) for the others -> label fields
        self.labels = labels
        self.wall_offset_ns = wall_offset_ns
        self.ifnames = ifnames            # InterfaceNames: (netns cookie, ifindex) -> (name, netns)
        self._drop_reasons = drop_reasons  # reason value -> name; read from kernel BTF on first use
        # Snap-length capture: the packet's bytes follow the struct (files from before it have no snap_len).
        self._snap = "snap_len" in self.names
        self._snap_l3 = self.flag.get("snap_l3", 0)
        self._id_partial = self.flag.get("id_partial", 0)  # objects and files from before it have none

    def decode_sched(self, raw: bytes) -> dict:
        e = self.sched_layout.decode(raw)
        where = self.labels.get((e["probe_id"], None)) or {"probe": f"probe{e['probe_id']}"}
        name = lambda b: b.split(b"\0", 1)[0].decode(errors="replace")  # noqa: E731
        return {"ts_ns": e["ts_ns"], "wall_ns": e["ts_ns"] + self.wall_offset_ns, "probe": where["probe"],
                "kind": "sched", "cpu": e["cpu"], "pid": e["pid"], "tgid": e["tgid"], "comm": name(e["comm"]),
                "runq_ns": e["runq_ns"], "prev_pid": e["prev_pid"], "prev_comm": name(e["prev_comm"])}

    def drop_reason(self, value: int) -> str:
        if self._drop_reasons is None:
            from vnet.binding import Btf  # only traces with drops need the kernel's enum

            with Btf.vmlinux() as btf:
                try:
                    names = btf.enum("skb_drop_reason")
                except KeyError:
                    names = {}
            self._drop_reasons = {v: k.removeprefix("SKB_DROP_REASON_") for k, v in names.items()}
        return self._drop_reasons.get(value, str(value))

    def decode(self, raw: bytes) -> dict:
        kind = int.from_bytes(raw[self._kind_at], "little")
        if kind == self._sched_kind and self.sched_layout is not None:
            return self.decode_sched(raw)
        layout, codec, names = self._packet.get(kind) or next(iter(self._packet.values()))
        e = dict(zip(names, codec.unpack_from(raw)))
        flags = e["flags"]
        hook = self.hooks.get(e["hook"], str(e["hook"]))
        where = self.labels.get((e["probe_id"], e["hook"])) or self.labels.get((e["probe_id"], None)) or {
            "probe": f"probe{e['probe_id']}"}
        ifname, ns = where.get("ifname"), where.get("netns")
        if ifname is None and e["ifindex"] and self.ifnames is not None:
            ifname, ns = self.ifnames.lookup(e["netns_cookie"], e["ifindex"])
        out = {
            "ts_ns": e["ts_ns"],
            "wall_ns": e["ts_ns"] + self.wall_offset_ns,
            "probe": where["probe"],
            "hook": hook,
            "ifname": ifname,
            "ifindex": e["ifindex"],
            "netns": ns,
            "dir": hook.rpartition("_")[2] if hook.startswith("tc_") else None,
            "len": e["len"],
            "pkt_id": f"{e['pkt_id']:016x}",
            "cpu": e["cpu"],
            "ethertype": e["eth_proto"],
            "proto": ETH_NAMES.get(e["eth_proto"], f"0x{e['eth_proto']:04x}"),
            "src": None, "dst": None, "sport": None, "dport": None,
        }
        if flags & self.flag["no_skb"]:
            out["proto"] = out["pkt_id"] = out["ethertype"] = None
        if e.get("reason"):
            out["reason"] = self.drop_reason(e["reason"])
        if e.get("pid"):
            out["pid"], out["comm"] = e["pid"], e["comm"].split(b"\0", 1)[0].decode(errors="replace")
        if flags & (self.flag["ipv4"] | self.flag["ipv6"]):
            v4 = bool(flags & self.flag["ipv4"])
            out["proto"] = L4_NAMES.get(e["l4_proto"], str(e["l4_proto"]))
            out["src"] = str(ipaddress.IPv4Address(e["saddr"][:4]) if v4 else ipaddress.IPv6Address(e["saddr"]))
            out["dst"] = str(ipaddress.IPv4Address(e["daddr"][:4]) if v4 else ipaddress.IPv6Address(e["daddr"]))
            out["ip_version"] = 4 if v4 else 6
            out["ttl"] = e["ttl"]
            if v4:
                out["ip_id"] = e["ip_id"]
            if flags & self.flag["ports"]:
                out["sport"], out["dport"] = e["sport"], e["dport"]
            if e["l4_proto"] in (1, 58):
                out["icmp_type"], out["icmp_code"] = e["dport"] >> 8, e["dport"] & 0xFF
                out["sport"] = out["dport"] = None
                out["icmp_id"] = e["sport"]
            if e["l4_proto"] == 6:
                out["tcp_seq"], out["tcp_ack"] = e["tcp_seq"], e["tcp_ack"]
                out["tcp_flags"] = "".join(ch for bit, ch in TCP_FLAG_LETTERS if e["tcp_flags"] & bit)
            if flags & self.flag["fragment"]:
                out["fragment"] = True
        if flags & self.flag["encap"]:
            out["vni"] = e.get("vni", 0)  # the tuple and pkt_id above are the inner packet's
        if flags & self.flag["vlan"]:
            out["vlan"] = e["vlan_tci"] & 0xFFF
        if flags & self.flag["truncated"]:
            out["truncated"] = True
        if flags & self._id_partial:
            out["pkt_id_partial"] = True  # a kernel hook could not read all the bytes tc hooks hash: ids may differ
        if e["mark"]:
            out["mark"] = e["mark"]
        if e["skb_addr"]:
            out["skb"] = f"{e['skb_addr']:x}"
        if self._snap and e["snap_len"]:
            start = layout.size
            data = bytes(raw[start:start + e["snap_len"]])
            if data:
                out["packet"] = data.hex()  # as tcpdump would capture it at this hook, up to the snap length
                out["packet_link"] = "raw" if flags & self._snap_l3 else "ethernet"  # where the bytes start
                out["packet_len"] = max(e.get("snap_wire", 0), len(data))  # the length they were cut from
        return out


def format_json(ev: dict) -> str:
    import json  # here: text output does not pay json's import (its regexes) at start

    return json.dumps(ev, separators=(",", ":"))


def _endpoint(addr: str | None, port: int | None) -> str:
    if addr is None:
        return "?"
    host = f"[{addr}]" if ":" in addr and port is not None else addr
    return f"{host}:{port}" if port is not None else host


def where(ev: dict) -> str:
    """`ns/ifname:dir` for device probes, `probe ns/ifname` for the others."""
    if ev["probe"].startswith("dev:"):
        return ev["probe"].removeprefix("dev:")
    iface = f"{ev['netns']}/{ev['ifname']}" if ev.get("netns") and ev.get("ifname") else ev.get("ifname")
    return f"{ev['probe']} {iface}" if iface else ev["probe"]


def format_text(ev: dict) -> str:
    """One line per packet per hook, tcpdump-like: time, hook, length, tuple, id."""
    secs, ns = divmod(ev["wall_ns"], 1_000_000_000)
    if ev.get("kind") == "sched":
        return (f"{secs}.{ns:09d} {ev['probe']:<24} pid {ev['pid']} ({ev['comm']}) waited "
                f"{ev['runq_ns'] / 1000:.1f} us for cpu {ev['cpu']}, after {ev['prev_pid']} ({ev['prev_comm']})")
    line = f"{secs}.{ns:09d} {where(ev):<24}"
    if ev["proto"] is None:  # a function probe without a packet
        line += f" call pid {ev.get('pid', 0)} {ev.get('comm', '')}".rstrip()
        return line
    line += f" len {ev['len']:<5} {ev['proto'].upper():<5}"
    if ev["src"] is not None:
        line += f" {_endpoint(ev['src'], ev['sport'])} > {_endpoint(ev['dst'], ev['dport'])}"
        if "tcp_flags" in ev:
            line += f" [{ev['tcp_flags'] or 'none'}] seq {ev['tcp_seq']}"
        elif "icmp_type" in ev:
            kind = (1 if ev["proto"] == "icmp" else 58, ev["icmp_type"])
            line += f" {ICMP_NAMES.get(kind, 'type %d' % ev['icmp_type'])}"
            if ev["icmp_type"] in (0, 8, 128, 129):
                line += f" id {ev['icmp_id']}"
    if "reason" in ev:
        line += f" drop {ev['reason']}"
    line += f" pkt_id {ev['pkt_id']}"
    return line
