"""Bulk decoding of trace files into numpy columns: no Python object per event.

A trace file's "events" chunks hold ring batches (vnet.binding.ringbatch
framing: per record an 8-byte header, u32 len|flags + u32, then the record
padded to 8). Records of one kind have one size, so a run of records with the
same header word is one strided numpy view; a blob is split into such runs
with a handful of numpy calls per run, whatever the number of records.

Each file is read chunk by chunk; only the columns the analysis needs are kept
(HostEvents), about 30 bytes per packet event.
"""

from __future__ import annotations

import ipaddress
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from vnet.binding import StructLayout
from vnet.binding.ringbatch import BUSY_BIT, DISCARD_BIT, HDR_SIZE, LEN_MASK
from vnet.collector.tracefile import TraceFileReader, event_decoder, layout_from_dict, stream_accounting
from vnet.errors import UsageError
from vnet.trace.records import where

from .clocksync import ClockMap

DROP_PROBE = "drop:kfree_skb"


def dtype_of(layout: StructLayout) -> np.dtype:
    """The numpy structured dtype of a BTF struct layout (native byte order, as the ring)."""
    names, formats, offsets = [], [], []
    for f in layout.fields:
        names.append(f.name)
        offsets.append(f.offset)
        if f.is_bytes:
            formats.append(f"S{f.size}")
        else:
            base = np.dtype(f"={f.fmt}")
            formats.append((base, (f.count,)) if f.count > 1 else base)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": layout.size})


def runs(blob: bytes | memoryview) -> Iterator[tuple[int, int, int, int]]:
    """(offset of the first record's data, stride, count, record length) for each run
    of same-header records in a ring-batch blob; discarded runs are skipped. A bad
    frame raises ValueError (the blob comes from a file)."""
    end = len(blob)
    words = np.frombuffer(blob, dtype=np.uint32, count=end // 4)
    pos = 0
    while pos < end:
        if end - pos < HDR_SIZE:
            raise ValueError(f"ring batch: {end - pos} stray bytes at offset {pos}")
        word = int(words[pos >> 2])
        size = ((word & LEN_MASK) + HDR_SIZE + 7) & ~7
        if word & BUSY_BIT or pos + size > end:
            raise ValueError(f"ring batch: bad record header {word:#x} at offset {pos}")
        n = _run_length(words, pos >> 2, size >> 2, (end - pos) // size, word)
        if not word & DISCARD_BIT:
            yield pos + HDR_SIZE, size, n, word & LEN_MASK
        pos += n * size


def _run_length(words: np.ndarray, idx: int, stride: int, most: int, word: int) -> int:
    """How many headers at idx, idx + stride, ... (at most `most`) equal `word`: checked
    in blocks that double, so a run costs O(its length) and a short run few calls."""
    done, step = 1, 64
    while done < most:
        step = min(step, most - done)
        block = words[idx + done * stride:idx + (done + step) * stride:stride]
        bad = np.flatnonzero(block != word)
        if bad.size:
            return done + int(bad[0])
        done += step
        step *= 2
    return done


@dataclass
class Flow:
    """Which packets to keep: every field that is set must match."""

    proto: int | None = None
    src: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    sport: int | None = None
    dport: int | None = None

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.proto, self.src, self.dst, self.sport, self.dport))


@dataclass
class HostEvents:
    """One host's events as columns, ts_ns on the host's own CLOCK_MONOTONIC."""

    host: str
    files: list[str] = field(default_factory=list)
    header: dict | None = None
    # packet events: hop is an index into `hops` (this host's hop names)
    ts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    pkt_id: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    hop: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint16))
    hops: list[str] = field(default_factory=list)
    # drop:kfree_skb events
    drops: dict[str, np.ndarray] = field(default_factory=dict)
    # sched:runq events
    sched: dict[str, np.ndarray] = field(default_factory=dict)
    clock: dict | None = None      # the best "clock" chunk: offset_ns, error_ns
    records: int = 0               # every record read (packet, sched, other)
    problems: list[str] = field(default_factory=list)


@dataclass
class Batch:
    """Consecutive packet events of one host, and the drops read with them (times less
    moved onto the collector's clock by HostReader.clock, hops or-ed with HostReader.hop_base)."""

    ts: np.ndarray
    pkt_id: np.ndarray
    hop: np.ndarray
    drops: dict[str, np.ndarray] | None


class _Columns:
    """Appends per-chunk arrays and concatenates once at the end."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, **cols: np.ndarray) -> None:
        for k, v in cols.items():
            self.parts.setdefault(k, []).append(v)

    def get(self, name: str, dtype) -> np.ndarray:
        parts = self.parts.get(name)
        return np.concatenate(parts) if parts else np.empty(0, dtype)


class HostReader:
    """Decodes the files of one host (the rotated series of a collector's HOST.vnt,
    or one `vnet trace -w` file) into HostEvents."""

    def __init__(self, host: str, header: dict, flow: Flow | None = None):
        try:  # the header comes from a file: a field of the wrong shape is its fault, said in words
            self._from_header(host, header, flow)
        except (AttributeError, TypeError, KeyError, ValueError, IndexError) as e:
            raise UsageError(f"trace of host {host}: the header does not describe its records "
                             f"({type(e).__name__}: {e})") from None

    def _from_header(self, host: str, header: dict, flow: Flow | None) -> None:
        abi = header.get("abi") or {}
        structs = abi.get("structs") or {}
        if "vnet_event" not in structs:
            raise UsageError(f"trace of host {host}: the header has no record layout (abi)")
        self.decoder = event_decoder(header)  # labels, interface names, byte order checks
        self.packet = dtype_of(layout_from_dict(structs["vnet_event"]))
        self.sched = dtype_of(layout_from_dict(structs["vnet_sched_event"])) if "vnet_sched_event" in structs \
            else None
        # files from before it have one packet struct with every field
        self.more = dtype_of(layout_from_dict(structs["vnet_event_more"])) if "vnet_event_more" in structs \
            else None
        kinds = (abi.get("enums") or {}).get("vnet_event_kind", {})
        self.kind_packet = kinds.get("VNET_KIND_PACKET", 1)
        self.kind_more = kinds.get("VNET_KIND_PACKET_MORE")
        self.kind_sched = kinds.get("VNET_KIND_SCHED", 2)
        self.kind_off = self.packet.fields["kind"][1]
        flags = {k.removeprefix("VNET_F_").lower(): v
                 for k, v in (abi.get("enums") or {}).get("vnet_event_flag", {}).items()}
        self.f_no_skb = flags.get("no_skb", 1 << 6)
        self.f_ipv4, self.f_ipv6, self.f_ports = flags.get("ipv4", 1), flags.get("ipv6", 2), flags.get("ports", 4)
        self.flow = flow if flow is not None and not flow.empty else None
        self.out = HostEvents(host, header=header)
        self._cols = _Columns()
        self._hop_ids: dict[int, int] = {}   # packed hop key -> index in out.hops
        self._drop_hops: set[int] = set()    # hop indexes of drop:kfree_skb
        self._known_keys = np.empty(0, np.uint64)  # self._hop_ids as sorted keys -> hop indexes
        self._known_lut = np.empty(0, np.uint16)
        self._n = 0
        self.packet_events = 0  # packet events handed out by batches()
        self.clock = ClockMap()  # batches(): the times onto the collector's clock
        self.pings: list[dict] = []  # every clock chunk read (add_clock)
        self.hop_base = 0       # batches(): or-ed into the hop indexes (the host's place)
        self.reserve(0)
        # device probes are named by (probe_id, hook) alone; the others also by the interface
        self._dev = {(pid, hook) for (pid, hook), w in self.decoder.labels.items() if hook is not None}
        # probe_id << 4 | hook -> -2: not a device probe, -1: a device probe's hop not seen yet,
        # else its hop index; the last entry stands for every key beyond the table
        size = max([p << 4 | h for p, h in self._dev if h < 16], default=0) + 2
        self._dev_table = np.full(size, -2, np.int32)
        for p, h in self._dev:
            if h < 16:
                self._dev_table[p << 4 | h] = -1

    # -- per chunk ------------------------------------------------------------------------------------

    def add_blob(self, blob: bytes | memoryview) -> None:
        for start, size, n, length in list(runs(blob)):  # a bad frame raises before anything is added
            kinds = np.ndarray((n,), np.uint16, blob, start + self.kind_off, (size,))
            k0 = int(kinds[0])
            uniform = bool((kinds == k0).all())
            for kind, dt, handle in ((self.kind_packet, self.packet, self._packets),
                                     (self.kind_more, self.more, self._packets),  # the same fields, and more
                                     (self.kind_sched, self.sched, self._sched_events)):
                if dt is None or kind is None or length < dt.itemsize or (uniform and k0 != kind):
                    continue
                recs = np.ndarray((n,), dt, blob, start, (size,))
                handle(recs if uniform else recs[kinds == kind])
            self.out.records += n

    def _packets(self, r: np.ndarray) -> None:
        # Masks apply to the columns taken out, never to the records: indexing a
        # structured view would copy whole records.
        keep = (r["flags"] & self.f_no_skb) == 0  # a function probe without a packet: on no path
        if self.flow is not None:
            keep &= self._flow_mask(r)
        if not keep.all():
            if not keep.any():
                return
            r = r[keep]  # rare: a copy of the records that stay
        hop = self._hop_index(r)
        ts, pkt = r["ts_ns"], r["pkt_id"]
        if self._drop_hops:
            drop = np.isin(hop, list(self._drop_hops))
            if drop.any():
                reason = r["reason"][drop].copy() if "reason" in r.dtype.names else np.zeros(int(drop.sum()), np.uint32)
                self._cols.add(d_ts=ts[drop].astype(np.int64), d_pkt=pkt[drop], d_reason=reason)
                keep = ~drop
                ts, pkt, hop = ts[keep], pkt[keep], hop[keep]
        self._append(ts, pkt, hop)

    def reserve(self, events: int) -> None:
        """Room for this many packet events, allocated once (pages are touched only as
        they fill): the columns are written in place, not gathered and concatenated."""
        self._ts = np.empty(events, np.int64)
        self._pkt = np.empty(events, np.uint64)
        self._hop = np.empty(events, np.uint16)

    def _append(self, ts: np.ndarray, pkt: np.ndarray, hop: np.ndarray) -> None:
        n, m = self._n, ts.size
        if n + m > self._ts.size:  # more than reserved: grow
            grow = max(2 * self._ts.size, n + m)
            for name in ("_ts", "_pkt", "_hop"):
                old = getattr(self, name)
                new = np.empty(grow, old.dtype)
                new[:n] = old[:n]
                setattr(self, name, new)
        self._ts[n:n + m] = ts
        self._pkt[n:n + m] = pkt
        self._hop[n:n + m] = hop
        self._n = n + m

    def _hop_index(self, r: np.ndarray) -> np.ndarray:
        """Each event's hop: (probe_id, hook) for device probes, (probe_id, netns, ifindex)
        for the others, packed in 64 bits; names are made once per distinct key."""
        small = r["probe_id"].astype(np.uint32)
        small <<= np.uint32(4)
        small |= r["hook"]                     # probe_id << 4 | hook: the device probes' whole key
        dev = None
        if self._dev:
            table = self._dev_table
            dev = table[np.minimum(small, table.size - 1)] >= -1
            dev &= small < table.size - 1
            if dev.all():  # only device probes here (tc traces): their hops by one lookup
                hop = table[small]
                if (hop >= 0).all():
                    return hop.astype(np.uint16)
                dev = True
        key = small.astype(np.uint64)
        key <<= np.uint64(44)
        if dev is not True:
            # exact while the values fit (they do in practice: small ids); else a hash of the netns cookie
            cookie = r["netns_cookie"].astype(np.uint64)
            cookie = np.where(cookie < (1 << 20), cookie, (cookie * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(44))
            low = r["ifindex"].astype(np.uint64)
            low &= np.uint64(0xFFFFFF)
            low |= cookie << np.uint64(24)
            if dev is not None:
                low[dev] = 0
            key |= low
        known = self._known_keys
        if known.size:
            at = np.searchsorted(known, key)
            np.minimum(at, known.size - 1, out=at)
            if (known[at] == key).all():  # the usual case: every hop seen before
                return self._known_lut[at]
        uniq = np.unique(key)
        for k in uniq.tolist():
            if k in self._hop_ids:
                continue
            first = r[int(np.argmax(key == k))]
            name = self._hop_name(first)
            idx = self._hop_ids[k] = len(self.out.hops)
            self.out.hops.append(name)
            if name.split(" ", 1)[0] == DROP_PROBE:
                self._drop_hops.add(idx)
        items = sorted(self._hop_ids.items())
        self._known_keys = np.array([k for k, _ in items], np.uint64)
        self._known_lut = np.array([v for _, v in items], np.uint16)
        for k, v in items:  # device hops into the direct table
            small_key = k >> 44
            if small_key < self._dev_table.size - 1 and self._dev_table[small_key] == -1:
                self._dev_table[small_key] = v
        return self._known_lut[np.searchsorted(self._known_keys, key)]

    def _hop_name(self, e: np.void) -> str:
        d = self.decoder
        pid, hook = int(e["probe_id"]), int(e["hook"])
        label = d.labels.get((pid, hook)) or d.labels.get((pid, None)) or {"probe": f"probe{pid}"}
        ifname, ns = label.get("ifname"), label.get("netns")
        if ifname is None and int(e["ifindex"]) and d.ifnames is not None:
            ifname, ns = d.ifnames.lookup(int(e["netns_cookie"]), int(e["ifindex"]))
        return where({"probe": label["probe"], "ifname": ifname, "netns": ns})

    def _flow_mask(self, r: np.ndarray) -> np.ndarray:
        f, flags = self.flow, r["flags"]
        ip = (flags & (self.f_ipv4 | self.f_ipv6)) != 0
        m = ip.copy()
        if f.proto is not None:
            m &= r["l4_proto"] == f.proto
        for net, col in ((f.src, "saddr"), (f.dst, "daddr")):
            if net is not None:
                m &= _in_net(r[col], flags, net, self.f_ipv4)
        for port, col in ((f.sport, "sport"), (f.dport, "dport")):
            if port is not None:
                m &= ((flags & self.f_ports) != 0) & (r[col] == port)
        return m

    def _sched_events(self, r: np.ndarray) -> None:
        self._cols.add(s_ts=r["ts_ns"].astype(np.int64), s_runq=r["runq_ns"].astype(np.int64),
                       s_pid=r["pid"], s_comm=r["comm"], s_prev_pid=r["prev_pid"], s_prev_comm=r["prev_comm"],
                       s_cpu=r["cpu"])

    def add_clock(self, chunk: dict) -> None:
        """Keep every ping (clocksync fits a line through them) and the one with the smallest
        error (the last of equals)."""
        off, err = chunk.get("offset_ns"), chunk.get("error_ns")
        if not isinstance(off, int) or not isinstance(err, int):
            return
        self.pings.append({k: chunk.get(k) for k in ("offset_ns", "error_ns", "at_ns", "agent_mono_ns")})
        if self.out.clock is None or err <= self.out.clock["error_ns"]:
            self.out.clock = {"offset_ns": off, "error_ns": err}

    def add_vanished(self, chunk: dict) -> None:
        """A traced interface that went away mid-trace (the agent's "vanished" chunk): said
        with the host's problems, since its hops have no events after that time."""
        from vnet.collector.tracefile import describe_vanished

        self.out.problems.append(describe_vanished(chunk))

    # -- the end --------------------------------------------------------------------------------------

    def finish(self) -> HostEvents:
        c, o = self._cols, self.out
        o.ts, o.pkt_id, o.hop = self._ts[:self._n], self._pkt[:self._n], self._hop[:self._n]
        self._n = 0
        self.reserve(0)
        o.drops = {"ts": c.get("d_ts", np.int64), "pkt_id": c.get("d_pkt", np.uint64),
                   "reason": c.get("d_reason", np.uint32)}
        o.sched = {"ts": c.get("s_ts", np.int64), "runq_ns": c.get("s_runq", np.int64),
                   "pid": c.get("s_pid", np.uint32), "comm": c.get("s_comm", "S16"),
                   "prev_pid": c.get("s_prev_pid", np.uint32), "prev_comm": c.get("s_prev_comm", "S16"),
                   "cpu": c.get("s_cpu", np.uint16)}
        self._cols = _Columns()
        return o

    def batches(self, files: list[TraceFileReader], batch_bytes: int = 4 << 20) -> Iterator["Batch"]:
        """This host's packet events piece by piece in file order, each piece a few MiB of
        records decoded at once (ring batches of consecutive chunks are framed alike, so
        their bytes are joined and split into runs together). Drop events come with the
        piece they were read in; clock chunks and sched events are kept as finish() does."""
        pending: list[tuple[TraceFileReader, int, bytes | memoryview]] = []
        size = 0
        self.reserve(2 * batch_bytes // (self.packet.itemsize + HDR_SIZE) + 1024)
        for f in files:
            for chunk in f.chunks(("events", "clock", "vanished"), views=True):
                if chunk["kind"] == "clock":
                    self.add_clock(chunk)
                    continue
                if chunk["kind"] == "vanished":
                    self.add_vanished(chunk)
                    continue
                blob = chunk.get("records")
                if isinstance(blob, (bytes, memoryview)):
                    pending.append((f, chunk["seq"], blob))
                    size += len(blob)
                    if size >= batch_bytes:
                        yield self._decode(pending)
                        pending, size = [], 0
            if f.truncated and f.problem:
                self.out.problems.append(f.problem)
        if pending:
            yield self._decode(pending)

    def _decode(self, pending: list[tuple[TraceFileReader, int, bytes | memoryview]]) -> "Batch":
        try:
            self.add_blob(b"".join(b for _, _, b in pending) if len(pending) > 1 else pending[0][2])
        except ValueError:  # a bad frame in one of them: chunk by chunk, to name it
            for f, seq, blob in pending:
                try:
                    self.add_blob(blob)
                except ValueError as e:
                    self.out.problems.append(f"{f.path}: chunk {seq}: {e}")
        n = self._n
        ts = self._ts[:n]
        self.clock.to_collector(ts)
        hop = self._hop[:n].astype(np.uint32)
        hop |= np.uint32(self.hop_base)
        batch = Batch(ts, self._pkt[:n], hop, None)
        if "d_ts" in self._cols.parts:
            c = self._cols
            batch.drops = {"ts": self.clock.to_collector(c.get("d_ts", np.int64).copy()), "pkt_id": c.get("d_pkt", np.uint64),
                           "reason": c.get("d_reason", np.uint32)}
            for k in ("d_ts", "d_pkt", "d_reason"):
                c.parts.pop(k, None)
        self.packet_events += n
        self._n = 0
        self.reserve(max(self._ts.size, n))  # fresh buffers: the batch keeps its own
        return batch

    def drop_reason(self, value: int) -> str:
        names = self.decoder._drop_reasons or {}
        return names.get(value, str(value))


def _in_net(addr: np.ndarray, flags: np.ndarray, net, f_ipv4: int) -> np.ndarray:
    """addr (S16 column: IPv4 in the first 4 bytes) inside the network `net`."""
    raw = np.frombuffer(addr.tobytes(), np.uint8).reshape(-1, 16)
    if net.version == 4:
        want = np.frombuffer(net.network_address.packed, np.uint8)
        mask = np.frombuffer(net.netmask.packed, np.uint8)
        ok = ((raw[:, :4] & mask) == want).all(axis=1)
        return ok & ((flags & f_ipv4) != 0)
    want = np.frombuffer(net.network_address.packed, np.uint8)
    mask = np.frombuffer(net.netmask.packed, np.uint8)
    return ((raw & mask) == want).all(axis=1) & ((flags & f_ipv4) == 0)


def expand(paths: list[str | os.PathLike]) -> list[Path]:
    """The trace files named: a directory stands for the .vnt files in it (and below)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(x for x in p.rglob("*") if x.is_file() and ".vnt" in x.name)
            if not found:
                raise UsageError(f"{p}: no trace files (*.vnt) in this directory")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise UsageError(f"{p}: no such file")
    return out


def files_by_host(paths: list[str | os.PathLike], hosts: list[str] | None = None
                  ) -> dict[str, list[TraceFileReader]]:
    """The readable trace files named (directories expanded), grouped by the host
    their header names, in the order named; `hosts`: only these, all of them present."""
    out: dict[str, list[TraceFileReader]] = {}
    for path in expand(paths):
        f = TraceFileReader(path)
        if f.header is None:
            continue
        host = str(f.header.get("host") or path.stem)
        if not hosts or host in hosts:
            out.setdefault(host, []).append(f)
    missing = set(hosts or ()) - set(out)
    if missing:
        raise UsageError(f"no trace of host {', '.join(sorted(missing))} in these files "
                         f"(hosts: {', '.join(sorted(out)) or 'none'})")
    return out


def read_hosts(paths: list[str | os.PathLike], *, flow: Flow | None = None,
               hosts: list[str] | None = None) -> list[HostEvents]:
    """Every host's events, file by file and chunk by chunk (rotations of one host
    become one HostEvents). Hosts are decoded in parallel threads (file reads,
    crc32 and numpy release the GIL)."""
    work = files_by_host(paths, hosts)
    readers = {host: HostReader(host, files[0].header, flow) for host, files in work.items()}
    for host, files in work.items():
        readers[host].out.files += [str(f.path) for f in files]
        readers[host].out.problems += stream_accounting(files)
        # an upper bound of its packet events: each takes at least a record's size in the files
        size = sum(os.path.getsize(f.path) for f in files)
        readers[host].reserve(size // (readers[host].packet.itemsize + HDR_SIZE) + 1)

    def decode(host: str) -> HostEvents:
        hr = readers[host]
        for f in work[host]:
            _read_file(hr, f)
        return hr.finish()

    if len(readers) < 2:
        return [decode(h) for h in readers]
    with ThreadPoolExecutor(max_workers=min(len(readers), os.cpu_count() or 1)) as pool:
        return list(pool.map(decode, list(readers)))


def _read_file(hr: HostReader, f: TraceFileReader) -> None:
    for chunk in f.chunks(("events", "clock", "vanished")):
        if chunk["kind"] == "clock":
            hr.add_clock(chunk)
            continue
        if chunk["kind"] == "vanished":
            hr.add_vanished(chunk)
            continue
        blob = chunk.get("records")
        if isinstance(blob, bytes):
            try:
                hr.add_blob(blob)
            except ValueError as e:
                hr.out.problems.append(f"{f.path}: chunk {chunk['seq']}: {e}")
    if f.truncated and f.problem:
        hr.out.problems.append(f.problem)
