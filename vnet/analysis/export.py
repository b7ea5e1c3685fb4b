"""`vnet export`: trace files into formats other tools read.

    jsonl     one JSON object per event, every host on one timeline, streamed
    parquet   the same events as a table (needs pyarrow: the `analysis` extra)
    perfetto  a Perfetto trace: a track per hook per host, an instant per packet
              event, a flow arrow along the hops of each packet, run-queue waits
              as slices on a track per watched thread, drops as instants
    pcapng    the packets' bytes (recorded with `vnet trace --snaplen N` or the
              spec's snaplen): an interface per hook per host, a packet block per
              event with epb_packetid = pkt_id; opens in Wireshark and tshark

The merged timeline is the collector's CLOCK_MONOTONIC: an event's `t_ns` is its
host's `ts_ns` minus that host's clock offset (agent - collector) at that time, as
`vnet analyze` maps them (vnet.analysis.clocksync: the collector's pings, refined by
the packets that cross between hosts). A host whose files have no clock chunk keeps
its own clock (offset 0).
"""

from __future__ import annotations

import heapq
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from vnet.collector.tracefile import TraceFileReader
from vnet.errors import UsageError
from vnet.trace.records import where

from .bulk import Flow, files_by_host
from .clocksync import ClockMap, from_pings
from .extras import EXTRA, require  # noqa: F401 -- require is this module's API too

FORMATS = ("jsonl", "parquet", "perfetto", "pcapng")
# Events a host's stream may be out of time order by, per event ring its files' header names (a
# reader's chunk per ring each round, up to 65536 records: 32 k measured under a flood, 2 rings).
REORDER_EVENTS = 1 << 16


# -- hosts, files and their clocks ----------------------------------------------------------------------


@dataclass
class HostFiles:
    host: str
    files: list[TraceFileReader] = field(default_factory=list)
    clock: ClockMap = field(default_factory=ClockMap)   # its clock onto the collector's


def host_files(paths: list[str | os.PathLike], hosts: list[str] | None = None) -> list[HostFiles]:
    """The files named (directories expanded), grouped by the host their header names,
    each host's rotations in order, with each host's clock map as `vnet analyze` makes it
    (the pings' line; with several hosts refined by the packets between them)."""
    from .stream import clock_maps

    out = {host: HostFiles(host, files=files) for host, files in files_by_host(paths, hosts).items()}
    for hf in out.values():
        hf.files.sort(key=lambda f: (int(f.header.get("part") or 0), str(f.path)))
    if len(out) > 1:
        for hf, clock in zip(out.values(), clock_maps(paths, hosts)):
            hf.clock = clock
    else:
        for hf in out.values():
            hf.clock = from_pings([c for f in hf.files for c in f.chunks(("clock",))])
    return list(out.values())


def _host_stream(hf: HostFiles, window: int) -> Iterator[tuple[int, int, dict]]:
    """(t_ns, n, event) of one host in time order, as long as no event arrives more
    than `window` events late (a bounded heap: memory stays O(window))."""
    heap: list[tuple[int, int, dict]] = []
    n = 0
    for f in hf.files:
        for ev in f.events():
            ts = int(ev["ts_ns"])
            t = ts - hf.clock.at(ts)
            ev = {"t_ns": t, "host": hf.host, "kind": "packet", **ev}  # sched events say "sched"
            heapq.heappush(heap, (t, n, ev))
            n += 1
            if len(heap) > window:
                yield heapq.heappop(heap)
    while heap:
        yield heapq.heappop(heap)


def _rings(hf: HostFiles) -> int:
    """The most event rings any of the host's files was written from (1: files from before them)."""
    counts = [(f.header or {}).get("rings") for f in hf.files]
    return max([n for n in counts if isinstance(n, int) and 1 <= n <= 64] or [1])


def merged_events(paths: list[str | os.PathLike], hosts: list[str] | None = None,
                  window: int = REORDER_EVENTS) -> Iterator[dict]:
    """Every event of every host, in order of t_ns on the merged timeline, streamed:
    per event its decoded fields (vnet trace --json), "host", and "t_ns"."""
    streams = [_host_stream(hf, window * _rings(hf)) for hf in host_files(paths, hosts)]
    for _, _, ev in heapq.merge(*streams, key=lambda x: (x[0], x[1])):
        yield ev


# -- jsonl ------------------------------------------------------------------------------------------------


def _open_out(out: str | os.PathLike, binary: bool) -> IO:
    if str(out) == "-":
        return sys.stdout.buffer if binary else sys.stdout
    return open(out, "wb" if binary else "w")


def write_jsonl(paths, out: str | os.PathLike, hosts: list[str] | None = None) -> int:
    """One JSON object per line per event; returns the number written."""
    n = 0
    f = _open_out(out, binary=False)
    try:
        dumps = json.JSONEncoder(separators=(",", ":")).encode
        for ev in merged_events(paths, hosts):
            f.write(dumps(ev))
            f.write("\n")
            n += 1
    finally:
        if f is not sys.stdout:
            f.close()
        else:
            f.flush()
    return n


# -- parquet ----------------------------------------------------------------------------------------------

# Every field an event can carry (vnet.trace.records), typed; absent ones are null.
PARQUET_FIELDS = (
    ("t_ns", "int64"), ("host", "string"), ("ts_ns", "uint64"), ("wall_ns", "uint64"), ("kind", "string"),
    ("probe", "string"), ("hook", "string"), ("ifname", "string"), ("ifindex", "uint32"), ("netns", "string"),
    ("dir", "string"), ("len", "uint32"), ("pkt_id", "string"), ("cpu", "uint32"), ("ethertype", "uint16"),
    ("proto", "string"), ("src", "string"), ("dst", "string"), ("sport", "uint16"), ("dport", "uint16"),
    ("ip_version", "uint8"), ("ttl", "uint8"), ("ip_id", "uint16"), ("tcp_seq", "uint32"),
    ("tcp_ack", "uint32"), ("tcp_flags", "string"), ("icmp_type", "uint8"), ("icmp_code", "uint8"),
    ("icmp_id", "uint16"), ("fragment", "bool"), ("vni", "uint32"), ("vlan", "uint16"),
    ("truncated", "bool"), ("mark", "uint32"), ("skb", "string"), ("reason", "string"), ("pid", "uint32"),
    ("tgid", "uint32"), ("comm", "string"), ("runq_ns", "uint64"), ("prev_pid", "uint32"),
    ("prev_comm", "string"), ("packet", "string"), ("packet_link", "string"),
    ("packet_len", "uint32"),
)


def parquet_schema():
    pa = require("pyarrow", "--to parquet")
    return pa.schema([(name, getattr(pa, "bool_" if t == "bool" else t)()) for name, t in PARQUET_FIELDS])


def write_parquet(paths, out: str | os.PathLike, hosts: list[str] | None = None, batch: int = 65536) -> int:
    """The merged events as one table (PARQUET_FIELDS), one row group per `batch`
    events: memory stays bounded. Returns the number of rows."""
    schema = parquet_schema()
    pa = require("pyarrow", "--to parquet")
    pq = require("pyarrow.parquet", "--to parquet")
    names = schema.names
    n = 0
    with pq.ParquetWriter(str(out), schema, compression="zstd") as w:
        cols: dict[str, list] = {k: [] for k in names}
        for ev in merged_events(paths, hosts):
            for k in names:
                cols[k].append(ev.get(k))
            n += 1
            if n % batch == 0:
                w.write_table(pa.table(cols, schema=schema))
                cols = {k: [] for k in names}
        if cols["t_ns"] or n == 0:
            w.write_table(pa.table(cols, schema=schema))
    return n


# -- pcapng -----------------------------------------------------------------------------------------------

LINKTYPE = {"ethernet": 1, "raw": 101}  # LINKTYPE_ETHERNET, LINKTYPE_RAW (the bytes start at the IP header)
PREV_HOPS = 1 << 20                    # packets whose last hop is remembered for the delta (oldest forgotten)
# pcapng option codes (the pcapng specification, draft-ietf-opsawg-pcapng)
OPT_END, OPT_COMMENT = 0, 1
IF_NAME, IF_DESCRIPTION, IF_TSRESOL = 2, 3, 9
EPB_FLAGS, EPB_PACKETID = 2, 5
EPB_INBOUND, EPB_OUTBOUND = 1, 2


@dataclass
class PcapngSummary:
    interfaces: int = 0
    packets: int = 0
    without_bytes: int = 0  # events that carry no packet bytes (snaplen 0, calls, sched): not written


class _PcapngBlocks:
    """The blocks vnet needs, through scapy's pcapng writer (RawPcapNgWriter: its
    section header and its block framing, build_block). Its own interface and packet
    blocks cannot carry what vnet writes (if_tsresol, if_description, epb_packetid,
    nanosecond timestamps), so the bodies and options of those two are built here and
    framed by the writer."""

    def __init__(self, out: str | os.PathLike):
        from scapy.utils import RawPcapNgWriter

        self.w = RawPcapNgWriter(str(out))
        self.e = self.w.endian
        self.w._write_block_shb()
        self.w.header_present = True

    def _opts(self, *opts: tuple[int, bytes]) -> bytes:
        out = b"".join(struct.pack(self.e + "HH", code, len(v)) + self.w._add_padding(v) for code, v in opts)
        return out + struct.pack(self.e + "HH", OPT_END, 0) if out else b""

    def interface(self, linktype: int, name: str, description: str) -> None:
        body = struct.pack(self.e + "HHI", linktype, 0, 0)  # snaplen 0: no limit
        opts = self._opts((IF_NAME, name.encode()), (IF_DESCRIPTION, description.encode()),
                          (IF_TSRESOL, bytes([9])))  # 10^-9: nanoseconds
        self.w.f.write(self.w.build_block(struct.pack(self.e + "I", 1), body, options=opts))

    def packet(self, ifid: int, ts_ns: int, data: bytes, orig_len: int, packet_id: int | None, comment: str,
               direction: int | None) -> None:
        body = struct.pack(self.e + "IIIII", ifid, (ts_ns >> 32) & 0xFFFFFFFF, ts_ns & 0xFFFFFFFF, len(data),
                           orig_len) + data
        opts = [(OPT_COMMENT, comment.encode())]
        if direction is not None:
            opts.append((EPB_FLAGS, struct.pack(self.e + "I", direction)))
        if packet_id is not None:
            opts.append((EPB_PACKETID, struct.pack(self.e + "Q", packet_id)))
        self.w.f.write(self.w.build_block(struct.pack(self.e + "I", 6), body, options=self._opts(*opts)))

    def close(self) -> None:
        self.w.close()


def _hook_name(ev: dict) -> str:
    """The hook as `vnet trace` names it: the probe, with the device for the others."""
    return where(ev) if not ev["probe"].startswith("dev:") else ev["probe"]


def write_pcapng(paths, out: str | os.PathLike, hosts: list[str] | None = None) -> PcapngSummary:
    """Every packet event that carries bytes, in time order on the merged timeline: one
    interface per (host, probe, link type) named "[HOST] PROBE" with the probe in
    if_description and nanosecond if_tsresol; an enhanced packet block per event with
    the captured bytes, their view's length as the original length (packet_len: the
    event's len, plus the link header at kernel hooks where skb->len has none),
    epb_packetid = pkt_id, the direction at device hooks, and a comment with
    the hook and the time since the packet's previous hop. Timestamps: the merged
    timeline shifted by one constant to UTC (the first event's host wall clock), so
    every delta between hosts is the analysis' one."""
    from collections import OrderedDict

    summary = PcapngSummary()
    ifaces: dict[tuple[str, str, str], int] = {}
    prev: OrderedDict[str, tuple[int, str]] = OrderedDict()  # pkt_id -> (t_ns, where) of its last hop
    shift = None
    blocks = _PcapngBlocks(out)
    try:
        for ev in merged_events(paths, hosts):
            data = ev.get("packet")
            if not data:
                summary.without_bytes += 1
                continue
            data = bytes.fromhex(data)
            if shift is None:
                shift = int(ev["wall_ns"]) - int(ev["t_ns"])
            link = ev.get("packet_link") or "ethernet"
            key = (ev["host"], ev["probe"], link)
            ifid = ifaces.get(key)
            if ifid is None:
                ifid = ifaces[key] = len(ifaces)
                blocks.interface(LINKTYPE[link], f"[{ev['host']}] {ev['probe']}", ev["probe"])
            t = int(ev["t_ns"])
            here = f"[{ev['host']}] {_hook_name(ev)}"
            pkt_id = ev.get("pkt_id")
            comment = here
            if pkt_id:
                last = prev.pop(pkt_id, None)
                if last is not None:
                    comment += f"; +{(t - last[0]) / 1000:.3f} us since {last[1]}"
                prev[pkt_id] = (t, here)
                if len(prev) > PREV_HOPS:
                    prev.popitem(last=False)
            if ev.get("reason"):
                comment += f"; dropped: {ev['reason']}"
            direction = {"ingress": EPB_INBOUND, "egress": EPB_OUTBOUND}.get(ev.get("dir"))
            blocks.packet(ifid, t + shift, data, int(ev.get("packet_len") or max(int(ev["len"]), len(data))),
                          int(pkt_id, 16) if pkt_id else None, comment, direction)
            summary.packets += 1
    finally:
        blocks.close()
    summary.interfaces = len(ifaces)
    if not summary.packets:
        Path(out).unlink(missing_ok=True)
        raise UsageError("no event in these files carries packet bytes: record them with `vnet trace --snaplen N` "
                         "(or `snaplen` in the trace spec)")
    return summary


# -- perfetto ---------------------------------------------------------------------------------------------

SEQ_ID = 0x766E6574  # "vnet": the one trusted packet sequence every packet is written on


@dataclass
class PerfettoSummary:
    tracks: int = 0        # hop tracks + sched tracks + drop tracks (host tracks not counted)
    host_tracks: int = 0
    hop_events: int = 0
    flows: int = 0         # flow arrows: consecutive hop pairs of one packet
    sched_slices: int = 0
    drops: int = 0


def write_perfetto(paths, out: str | os.PathLike, hosts: list[str] | None = None, flow: Flow | None = None,
                   sched: bool = True) -> PerfettoSummary:
    """A Perfetto trace (open it at ui.perfetto.dev): per host a parent track, under it
    one track per hook with an instant per packet event (named by pkt_id, the time since
    the previous hop as an argument) and flow arrows hop to hop along each packet; drops
    on a `drop:kfree_skb` track; with sched events, a track per watched thread whose
    slices are its run-queue waits (overlapping waits of one thread go to extra lanes).
    Times are on the merged timeline (collector's clock), packets written in time order."""
    require("perfetto.trace_builder.proto_builder", "--to perfetto")
    from perfetto.trace_builder.proto_builder import StreamingTraceProtoBuilder
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import TrackEvent

    from .stream import read_table

    tl = read_table(paths, flow=flow, hosts=hosts)
    if not tl.hosts:
        raise UsageError("no readable trace in these files")
    inst = tl.instances()
    summary = PerfettoSummary()
    uuid = iter(range(1, 1 << 62))

    # tracks: host -> hop / drops / threads
    host_uuid = [next(uuid) for _ in tl.hosts]
    multi = len(tl.hosts) > 1
    descriptors = [(host_uuid[i], None, f"{h.host}" + (f" (clock ±{_us(tl.error_ns[i])})"
                                                       if multi and tl.error_ns[i] is not None else ""))
                   for i, h in enumerate(tl.hosts)]
    hop_uuid: dict[int, int] = {}
    for j in np.unique(inst.hop).tolist():  # hops with packet events (not drop:kfree_skb: its own track)
        hi = int(tl.hop_host[j])
        hop_uuid[j] = next(uuid)
        descriptors.append((hop_uuid[j], host_uuid[hi], tl.hop_names[j].removeprefix(f"[{tl.hosts[hi].host}] ")))
    drop_uuid: dict[int, int] = {}
    for hi in sorted(set(tl.drops["host"].tolist())) if tl.drops["ts"].size else ():
        drop_uuid[hi] = next(uuid)
        descriptors.append((drop_uuid[hi], host_uuid[hi], "drop:kfree_skb"))
    summary.host_tracks = len(host_uuid)

    # packet events: instance (flow) ids, time since the previous hop
    n = int(inst.ts.size)
    iid = np.repeat(np.arange(inst.count, dtype=np.int64), inst.sizes)
    first = np.zeros(n, bool)
    last = np.zeros(n, bool)
    if n:
        first[inst.start[:-1]] = True
        last[inst.start[1:] - 1] = True
    since = np.zeros(n, np.int64)
    since[~first] = np.diff(inst.ts)[~first[1:]] if n else since[~first]
    single = first & last

    # sched waits: [ts - runq, ts] per (host, pid), lanes for overlaps
    s = tl.sched if sched else {}
    s_lane_uuid = np.empty(0, np.int64)
    if s and s["ts"].size:
        order = np.lexsort((s["ts"] - s["runq_ns"], s["pid"], s["host"]))
        lanes: dict[tuple[int, int], list[int]] = {}  # (host, pid) -> lane end times
        lane_uuid: dict[tuple[int, int, int], int] = {}
        s_lane_uuid = np.empty(s["ts"].size, np.int64)
        for k in order.tolist():
            hi, pid = int(s["host"][k]), int(s["pid"][k])
            begin, end = int(s["ts"][k] - s["runq_ns"][k]), int(s["ts"][k])
            ends = lanes.setdefault((hi, pid), [])
            lane = next((i for i, e in enumerate(ends) if e <= begin), len(ends))
            if lane == len(ends):
                ends.append(end)
                comm = bytes(s["comm"][k]).split(b"\0", 1)[0].decode(errors="replace")
                u = lane_uuid[(hi, pid, lane)] = next(uuid)
                descriptors.append((u, host_uuid[hi], f"runq {comm} [{pid}]" + (f" #{lane + 1}" if lane else "")))
            ends[lane] = end
            s_lane_uuid[k] = lane_uuid[(hi, pid, lane)]

    # one time order over everything: (ts, kind, index); kinds: 0 slice end, 1 packet, 2 drop, 3 slice begin
    parts_t, parts_k, parts_i = [inst.ts], [np.ones(n, np.int8)], [np.arange(n)]
    if drop_uuid:
        parts_t.append(tl.drops["ts"])
        parts_k.append(np.full(tl.drops["ts"].size, 2, np.int8))
        parts_i.append(np.arange(tl.drops["ts"].size))
    if s_lane_uuid.size:
        m = s["ts"].size
        parts_t += [s["ts"] - s["runq_ns"], s["ts"]]
        parts_k += [np.full(m, 3, np.int8), np.zeros(m, np.int8)]
        parts_i += [np.arange(m), np.arange(m)]
    all_t, all_k, all_i = (np.concatenate(p) for p in (parts_t, parts_k, parts_i))
    order = np.lexsort((all_k, all_t))

    with open(out, "wb") as f:
        b = StreamingTraceProtoBuilder(f)
        for u, parent, name in descriptors:
            p = b.create_packet()
            p.trusted_packet_sequence_id = SEQ_ID
            p.track_descriptor.uuid = u
            if parent is not None:
                p.track_descriptor.parent_uuid = parent
            p.track_descriptor.name = name
            b.write_packet(p)
        summary.tracks = len(descriptors) - len(host_uuid)
        INSTANT, BEGIN, END = TrackEvent.TYPE_INSTANT, TrackEvent.TYPE_SLICE_BEGIN, TrackEvent.TYPE_SLICE_END
        ts_l, kind_l, idx_l = all_t[order].tolist(), all_k[order].tolist(), all_i[order].tolist()
        pkt_l, hop_l = inst.pkt_id.tolist(), inst.hop.tolist()
        for t, kind, i in zip(ts_l, kind_l, idx_l):
            p = b.create_packet()
            p.trusted_packet_sequence_id = SEQ_ID
            p.timestamp = t
            te = p.track_event
            if kind == 1:
                te.type = INSTANT
                te.track_uuid = hop_uuid[hop_l[i]]
                te.name = f"pkt {pkt_l[i]:016x}"
                a = te.debug_annotations.add()
                a.name, a.string_value = "pkt_id", f"{pkt_l[i]:016x}"
                if not first[i]:
                    a = te.debug_annotations.add()
                    a.name, a.int_value = "since_prev_hop_ns", int(since[i])
                if not single[i]:
                    fid = int(iid[i]) + 1
                    if last[i]:
                        te.terminating_flow_ids.append(fid)
                    else:
                        te.flow_ids.append(fid)
                        summary.flows += 1
                summary.hop_events += 1
            elif kind == 2:
                hi = int(tl.drops["host"][i])
                te.type = INSTANT
                te.track_uuid = drop_uuid[hi]
                reason = _reason(tl.hosts[hi], int(tl.drops["reason"][i]))
                te.name = f"drop {reason}"
                a = te.debug_annotations.add()
                a.name, a.string_value = "pkt_id", f"{int(tl.drops['pkt_id'][i]):016x}"
                summary.drops += 1
            elif kind == 3:
                te.type = BEGIN
                te.track_uuid = int(s_lane_uuid[i])
                prev = bytes(s["prev_comm"][i]).split(b"\0", 1)[0].decode(errors="replace")
                te.name = f"runq wait (CPU held by {prev} [{int(s['prev_pid'][i])}])"
                for key, val in (("runq_ns", int(s["runq_ns"][i])), ("cpu", int(s["cpu"][i]))):
                    a = te.debug_annotations.add()
                    a.name, a.int_value = key, val
                summary.sched_slices += 1
            else:
                te.type = END
                te.track_uuid = int(s_lane_uuid[i])
            b.write_packet(p)
    return summary


def _reason(host, value: int) -> str:
    names = {int(v): str(n) for v, n in (host.header or {}).get("drop_reasons") or ()}
    return names.get(value, str(value))


def _us(ns: int) -> str:
    return f"{ns / 1000:.1f}us"


# -- the entry point --------------------------------------------------------------------------------------


def export(paths, fmt: str, out: str | os.PathLike, *, hosts: list[str] | None = None,
           flow: Flow | None = None, sched: bool = True) -> dict:
    """Write `paths` as `fmt` to `out`; returns what was written (for the summary line)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    if flow is not None and not flow.empty and fmt != "perfetto":
        raise UsageError(f"flow filters apply to --to perfetto and --plot only, not to --to {fmt}")
    if str(out) != "-" and Path(out).is_dir():
        raise UsageError(f"{out} is a directory: -o names the output file")
    if fmt == "jsonl":
        return {"events": write_jsonl(paths, out, hosts)}
    if str(out) == "-":
        raise UsageError(f"--to {fmt} writes a binary file: give -o FILE")
    if fmt == "parquet":
        return {"rows": write_parquet(paths, out, hosts)}
    if fmt == "pcapng":
        p = write_pcapng(paths, out, hosts)
        return {"packets": p.packets, "interfaces": p.interfaces, "events_without_bytes": p.without_bytes}
    s = write_perfetto(paths, out, hosts, flow=flow, sched=sched)
    return {"tracks": s.tracks, "hop_events": s.hop_events, "flows": s.flows, "sched_slices": s.sched_slices,
            "drops": s.drops}
