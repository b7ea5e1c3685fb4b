"""Snap-length capture on synthetic records (the real object's BTF layout, no kernel):
the decoder's `packet`, records longer than the struct through every reader (trace
file, numpy bulk decode), and `vnet export --to pcapng` parsed back (with scapy, and
with tshark where it is installed)."""

import ipaddress
import json
import shutil
import struct
import subprocess
from decimal import Decimal

import numpy as np
import pytest

from vnet.analysis import export as ex
from vnet.analysis.bulk import read_hosts
from vnet.binding import Btf
from vnet.binding.ringbatch import pack_records
from vnet.collector.tracefile import TraceFileReader, TraceFileWriter, abi_from_btf, labels_to_list
from vnet.objects import object_path
from vnet.trace.records import EventDecoder, format_json

LABELS = {(0, 1): {"probe": "dev:ns1/veth0:ingress", "ifname": "veth0", "netns": "ns1", "layer": "device"},
          (0, 2): {"probe": "dev:ns1/veth0:egress", "ifname": "veth0", "netns": "ns1", "layer": "device"},
          (1, None): {"probe": "net:netif_receive_skb", "layer": "stack"}}
WALL = 1_700_000_000_000_000_000


@pytest.fixture(scope="module")
def btf():
    with Btf.from_file(str(object_path("tc_trace"))) as b:
        yield b


def frame(i: int) -> bytes:
    """An Ethernet + IPv4 + UDP frame whose payload says which packet it is."""
    payload = b"vnet-snap-%04d" % i + bytes(range(40))
    udp = struct.pack("!HHHH", 1000 + i, 53, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                     ipaddress.IPv4Address("10.0.0.1").packed, ipaddress.IPv4Address("10.0.0.2").packed) + udp
    return bytes.fromhex("020000000002020000000001") + b"\x08\x00" + ip


def snap_record(btf, i: int, *, data: bytes, hook: str = "TC_INGRESS", probe_id: int = 0, ts: int = 0,
                flags: tuple[str, ...] = ("IPV4", "PORTS"), length: int | None = None) -> bytes:
    f = btf.enum("vnet_event_flag")
    snap_max = btf.enum("vnet_snap")["VNET_SNAP_MAX"]
    ev = btf.struct("vnet_event_more").encode({
        "ts_ns": ts or 1_000_000 + i * 10_000, "pkt_id": 0xABC000 + i, "probe_id": probe_id, "ifindex": 3,
        "len": len(frame(i)) if length is None else length, "hook": btf.enum("vnet_hook")[f"VNET_HOOK_{hook}"],
        "eth_proto": 0x0800, "cpu": 1, "l4_proto": 17, "sport": 1000 + i, "dport": 53, "ttl": 64, "ip_id": i,
        "kind": btf.enum("vnet_event_kind")["VNET_KIND_PACKET_MORE"], "flags": sum(f[f"VNET_F_{n}"] for n in flags),
        "saddr": ipaddress.IPv4Address("10.0.0.1").packed, "daddr": ipaddress.IPv4Address("10.0.0.2").packed,
        "snap_len": len(data), "snap_wire": (len(frame(i)) - 14 * ("SNAP_L3" in flags)) if data else 0})
    return ev + data + bytes(snap_max - len(data))  # the constant-size reservation of vnet_emit_snap


@pytest.fixture(scope="module")
def decoder(btf):
    enums = {n: btf.enum(n) for n in ("vnet_hook", "vnet_event_flag", "vnet_event_kind")}
    return EventDecoder(btf.struct("vnet_event"), enums, LABELS, wall_offset_ns=WALL,
                        more_layout=btf.struct("vnet_event_more"))


def test_the_snap_fields_and_the_limit_agree(btf):
    """snap_len sits in the common event (in what was padding), snap_wire in the longer
    record every snap capture is (vnet_snap_record)."""
    from vnet.trace.session import SNAP_MAX

    layout = btf.struct("vnet_event")
    assert btf.enum("vnet_snap")["VNET_SNAP_MAX"] == SNAP_MAX
    f = layout.field("snap_len")
    assert f.size == 2 and f.offset + f.size <= layout.field("saddr").offset
    assert "snap_wire" not in layout.names and "snap_wire" in btf.struct("vnet_event_more").names


def test_decoder_exposes_the_bytes_as_hex(btf, decoder):
    data = frame(1)[:64]
    ev = decoder.decode(snap_record(btf, 1, data=data))
    assert bytes.fromhex(ev["packet"]) == data and ev["packet_link"] == "ethernet"
    assert ev["packet_len"] == len(frame(1))  # the length the 64 bytes were cut from
    assert ev["src"] == "10.0.0.1" and ev["sport"] == 1001 and ev["len"] == len(frame(1))
    assert json.loads(format_json(ev))["packet"] == data.hex()


def test_decoder_marks_bytes_that_start_at_the_ip_header(btf, decoder):
    ip = frame(2)[14:]
    ev = decoder.decode(snap_record(btf, 2, data=ip, flags=("IPV4", "PORTS", "SNAP_L3")))
    assert bytes.fromhex(ev["packet"]) == ip and ev["packet_link"] == "raw" and ev["packet_len"] == len(ip)


def test_no_bytes_no_packet_key(btf, decoder):
    plain = btf.struct("vnet_event").encode({"ts_ns": 5, "hook": 1, "eth_proto": 0x0800, "len": 60, "kind": 1})
    assert "packet" not in decoder.decode(plain)  # snaplen 0: the record is the struct alone
    assert "packet" not in decoder.decode(snap_record(btf, 3, data=b""))  # nothing captured (e.g. no skb)
    assert "packet_link" not in decoder.decode(snap_record(btf, 3, data=b""))


def test_a_layout_without_snap_len_still_decodes(btf):
    """Files written before snap capture have no snap_len in their layout."""
    from vnet.binding import StructLayout

    layout = btf.struct("vnet_event_more")  # the one packet struct those files have
    old = StructLayout("vnet_event", layout.size, [f for f in layout.fields if f.name not in ("snap_len", "snap_wire")])
    enums = {n: btf.enum(n) for n in ("vnet_hook", "vnet_event_flag")}
    ev = EventDecoder(old, enums, LABELS, wall_offset_ns=0).decode(snap_record(btf, 4, data=frame(4)[:32]))
    assert "packet" not in ev and ev["sport"] == 1004


def write_trace(path, btf, records, host="hv1"):
    header = {"trace": "snap", "host": host, "kernel": "6.1.0", "abi": abi_from_btf(btf),
              "labels": labels_to_list(LABELS), "clock": {"wall_offset_ns": WALL}}
    with TraceFileWriter(path, header) as w:
        w.write("events", seq=0, records=pack_records(records), count=len(records))


@pytest.fixture()
def snap_file(tmp_path, btf):
    """Four packets, each at ingress then egress of veth0 then netif_receive_skb (IP view)."""
    recs = []
    for i in range(4):
        t = 1_000_000 + i * 100_000
        recs.append(snap_record(btf, i, data=frame(i)[:128], hook="TC_INGRESS", ts=t))
        recs.append(snap_record(btf, i, data=frame(i)[:128], hook="TC_EGRESS", ts=t + 1500))
        recs.append(snap_record(btf, i, data=frame(i)[14:], hook="TP_BTF", probe_id=1, ts=t + 4000,
                                flags=("IPV4", "PORTS", "SNAP_L3"), length=len(frame(i)) - 14))
    path = tmp_path / "snap.vnt"
    write_trace(path, btf, recs)
    return path


def test_longer_records_through_the_file_and_the_bulk_decoder(snap_file):
    events = list(TraceFileReader(snap_file).events())
    assert len(events) == 12 and all("packet" in e for e in events)
    assert [e["sport"] for e in events[:3]] == [1000] * 3
    hosts = read_hosts([snap_file])  # numpy over the raw chunks: strides by the record size, not the struct's
    assert len(hosts) == 1
    h = hosts[0]
    assert h.records == 12 and h.pkt_id.size == 12 and not h.problems
    assert np.array_equal(np.sort(h.pkt_id), np.repeat(0xABC000 + np.arange(4, dtype=np.uint64), 3))
    assert np.array_equal(np.sort(h.ts), np.sort([1_000_000 + i * 100_000 + d for i in range(4)
                                                   for d in (0, 1500, 4000)]))
    assert len(set(h.hop.tolist())) == 3 and any("netif_receive_skb" in n for n in h.hops)


def read_pcapng(path):
    from scapy.utils import RawPcapNgReader

    out = []
    with RawPcapNgReader(str(path)) as r:
        for data, meta in r:
            out.append((data, meta))
        return out, r


def test_pcapng_export_interfaces_bytes_ids_and_comments(snap_file, tmp_path):
    out = tmp_path / "x.pcapng"
    s = ex.write_pcapng([snap_file], out)
    assert (s.packets, s.interfaces, s.without_bytes) == (12, 3, 0)
    raw = out.read_bytes()
    # one interface description block per hook, nanoseconds (if_tsresol = 9) and the hook in if_description
    idbs = []
    pos = 0
    while pos < len(raw):
        btype, blen = struct.unpack_from("<II", raw, pos)
        if btype == 1:
            linktype = struct.unpack_from("<H", raw, pos + 8)[0]
            opts, o = {}, pos + 16
            while o < pos + blen - 4:
                code, olen = struct.unpack_from("<HH", raw, o)
                if code == 0:
                    break
                opts[code] = raw[o + 4:o + 4 + olen]
                o += 4 + (olen + 3) // 4 * 4
            idbs.append((linktype, opts))
        pos += blen
    assert [lt for lt, _ in idbs] == [1, 1, 101]
    assert [o[3].decode() for _, o in idbs] == ["dev:ns1/veth0:ingress", "dev:ns1/veth0:egress",
                                                "net:netif_receive_skb"]
    assert all(o[9] == b"\x09" for _, o in idbs)
    packets, _ = read_pcapng(out)
    assert len(packets) == 12
    data0, meta0 = packets[0]
    assert data0 == frame(0)[:128] and meta0.wirelen == len(frame(0)) and meta0.linktype == 1
    assert meta0.tsresol == 10 ** 9
    assert packets[2][0] == frame(0)[14:] and packets[2][1].linktype == 101
    if shutil.which("tshark"):
        def tshark(*args):
            return subprocess.run(["tshark", "-r", str(out), *args], capture_output=True, text=True, check=True)

        fields = tshark("-T", "fields", "-e", "frame.packet_id", "-e", "frame.time_epoch", "-e", "frame.comment",
                        "-e", "udp.srcport", "-e", "frame.interface_description").stdout.splitlines()
        assert len(fields) == 12
        pid, t, comment, sport, desc = fields[1].split("\t")
        assert int(pid) == 0xABC000 and sport == "1000" and desc == "dev:ns1/veth0:egress"
        assert "[hv1] dev:ns1/veth0:egress" in comment and "+1.500 us since [hv1] dev:ns1/veth0:ingress" in comment
        t0 = fields[0].split("\t")[1]
        assert (Decimal(t) - Decimal(t0)) * 10 ** 9 == 1500  # nanosecond timestamps
        hops = tshark("-Y", f"frame.packet_id == {0xABC002}").stdout.splitlines()
        assert len(hops) == 3


def test_pcapng_of_events_without_bytes_is_refused(tmp_path, btf):
    path = tmp_path / "plain.vnt"
    write_trace(path, btf, [btf.struct("vnet_event").encode({"ts_ns": 5, "hook": 1, "len": 60, "kind": 1})])
    out = tmp_path / "y.pcapng"
    with pytest.raises(ex.UsageError, match="snaplen"):
        ex.write_pcapng([path], out)
    assert not out.exists()
