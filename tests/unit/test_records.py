"""Event decoding and formatting, on records built from the real object's BTF
layout (pure logic: no kernel involved, the record bytes are synthesized)."""

import ipaddress
import json

import pytest

from vnet.binding import Btf
from vnet.objects import object_path
from vnet.trace.records import EventDecoder, format_json, format_text


@pytest.fixture(scope="module")
def btf():
    with Btf.from_file(str(object_path("tc_trace"))) as b:
        yield b


ENUMS = ("vnet_hook", "vnet_event_flag", "vnet_event_kind")


def make_decoder(btf, labels, wall_offset_ns=0, **kw):
    enums = {n: btf.enum(n) for n in ENUMS}
    return EventDecoder(btf.struct("vnet_event"), enums, labels, wall_offset_ns,
                        more_layout=btf.struct("vnet_event_more"), **kw)


@pytest.fixture(scope="module")
def decoder(btf):
    probes = {(0, 2): {"probe": "dev:ns1/veth0:egress", "ifname": "veth0", "netns": "ns1"}}
    return make_decoder(btf, probes, wall_offset_ns=1_000_000_000_000)


def record(btf, **fields):
    """A packet record as the programs write it: struct vnet_event, or struct
    vnet_event_more where a field only that one has is set."""
    flags, kinds = btf.enum("vnet_event_flag"), btf.enum("vnet_event_kind")
    base = {"ts_ns": 5_000_000_123, "pkt_id": 0xDEADBEEF00C0FFEE, "probe_id": 0, "ifindex": 7, "len": 98,
            "hook": btf.enum("vnet_hook")["VNET_HOOK_TC_EGRESS"], "eth_proto": 0x0800, "cpu": 1}
    base.update(fields)
    base["flags"] = sum(flags[f"VNET_F_{n.upper()}"] for n in base.pop("flag_names", []))
    plain = btf.struct("vnet_event")
    more = not set(base) <= set(plain.names)
    base["kind"] = kinds["VNET_KIND_PACKET_MORE" if more else "VNET_KIND_PACKET"]
    return (btf.struct("vnet_event_more") if more else plain).encode(base)


def test_udp_ipv4_event_decodes_to_json_fields(btf, decoder):
    raw = record(btf, l4_proto=17, sport=5000, dport=6000, ip_id=77, ttl=64, flag_names=["ipv4", "ports"],
                 saddr=ipaddress.IPv4Address("10.0.0.1").packed, daddr=ipaddress.IPv4Address("10.0.0.2").packed)
    ev = decoder.decode(raw)
    assert ev["probe"] == "dev:ns1/veth0:egress" and ev["netns"] == "ns1" and ev["dir"] == "egress"
    assert (ev["proto"], ev["src"], ev["dst"], ev["sport"], ev["dport"]) == ("udp", "10.0.0.1", "10.0.0.2", 5000, 6000)
    assert ev["pkt_id"] == "deadbeef00c0ffee"
    assert ev["wall_ns"] == 5_000_000_123 + 1_000_000_000_000
    assert json.loads(format_json(ev)) == ev
    line = format_text(ev)
    assert "ns1/veth0:egress" in line and "10.0.0.1:5000 > 10.0.0.2:6000" in line and "len 98" in line


def test_tcp_ipv6_event_shows_flags_and_brackets(btf, decoder):
    raw = record(btf, eth_proto=0x86DD, l4_proto=6, sport=443, dport=40000, tcp_seq=1000, tcp_ack=2000,
                 tcp_flags=0x12, flag_names=["ipv6", "ports"],
                 saddr=ipaddress.IPv6Address("fd00::1").packed, daddr=ipaddress.IPv6Address("fd00::2").packed)
    ev = decoder.decode(raw)
    assert ev["proto"] == "tcp" and ev["tcp_flags"] == "S." and ev["tcp_seq"] == 1000 and ev["ip_version"] == 6
    assert "[fd00::1]:443 > [fd00::2]:40000 [S.] seq 1000" in format_text(ev)


def test_non_ip_and_unknown_probe(btf, decoder):
    ev = decoder.decode(record(btf, eth_proto=0x0806, probe_id=9))
    assert ev["proto"] == "arp" and ev["src"] is None and ev["probe"] == "probe9" and ev["dir"] == "egress"
    assert "ARP" in format_text(ev)


def test_function_probe_event_names_interface_drop_reason_and_task(btf):
    """A catalog probe (no fixed interface): the interface comes from the
    (netns cookie, ifindex) table, the reason from the kernel's enum, and a
    packet-less call prints as such. The interface table here is a stand-in."""
    class Names:
        def lookup(self, cookie, ifindex):
            return ("eth0", "vm2") if (cookie, ifindex) == (77, 7) else (None, None)

    dec = make_decoder(btf, {(3, None): {"probe": "drop:kfree_skb"}}, ifnames=Names(), drop_reasons={5: "NO_SOCKET"})
    hook = btf.enum("vnet_hook")["VNET_HOOK_TP_BTF"]
    ev = dec.decode(record(btf, probe_id=3, hook=hook, netns_cookie=77, reason=5, pid=42, comm=b"nc\0",
                           l4_proto=17, sport=1, dport=2, flag_names=["ipv4", "ports"]))
    assert (ev["probe"], ev["hook"], ev["dir"], ev["ifname"], ev["netns"]) == ("drop:kfree_skb", "tp_btf", None,
                                                                               "eth0", "vm2")
    assert (ev["reason"], ev["pid"], ev["comm"]) == ("NO_SOCKET", 42, "nc")
    assert format_text(ev).split()[1:3] == ["drop:kfree_skb", "vm2/eth0"] and "drop NO_SOCKET" in format_text(ev)
    call = dec.decode(record(btf, probe_id=3, hook=hook, pid=9, comm=b"vhost-1", flag_names=["no_skb"]))
    assert call["proto"] is None and call["pkt_id"] is None and "call pid 9 vhost-1" in format_text(call)


def test_the_longer_record_and_a_file_from_before_it_decode_alike(btf):
    """A drop is a struct vnet_event_more record (VNET_KIND_PACKET_MORE); files written
    before that struct existed have one packet struct with every field, and kind 1.
    Both decode to the same event; a VXLAN record carries its vni the same way."""
    from vnet.binding.btf import StructLayout

    fields = dict(probe_id=3, hook=btf.enum("vnet_hook")["VNET_HOOK_TP_BTF"], reason=5, pid=42, comm=b"nc\0",
                  l4_proto=17, sport=1, dport=2, flag_names=["ipv4", "ports", "encap"], vni=4242)
    raw = record(btf, **fields)
    assert len(raw) == btf.struct("vnet_event_more").size > btf.struct("vnet_event").size
    labels = {(3, None): {"probe": "drop:kfree_skb"}}
    now = make_decoder(btf, labels, drop_reasons={5: "NO_SOCKET"}).decode(raw)
    more = btf.struct("vnet_event_more")
    old_layout = StructLayout("vnet_event", more.size, more.fields)  # the same fields in one struct
    old_enums = {n: btf.enum(n) for n in ("vnet_hook", "vnet_event_flag")}
    old = EventDecoder(old_layout, old_enums, labels, 0, drop_reasons={5: "NO_SOCKET"})
    old_raw = bytearray(raw)
    kind = more.field("kind")
    old_raw[kind.offset:kind.offset + kind.size] = (1).to_bytes(kind.size, "little")
    assert old.decode(bytes(old_raw)) == now
    assert (now["reason"], now["pid"], now["comm"], now["vni"]) == ("NO_SOCKET", 42, "nc", 4242)


def test_icmp_echo_is_named(btf, decoder):
    raw = record(btf, l4_proto=1, sport=33, dport=8 << 8, flag_names=["ipv4"],
                 saddr=bytes([10, 0, 0, 1]) + bytes(12), daddr=bytes([10, 0, 0, 2]) + bytes(12))
    ev = decoder.decode(raw)
    assert (ev["icmp_type"], ev["icmp_id"], ev["sport"]) == (8, 33, None)
    assert "echo request id 33" in format_text(ev)
