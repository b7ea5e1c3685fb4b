"""The path join as a stream: bounded windows of events in, compact per-packet rows out.

Each host's files are decoded piece by piece (in a child process per host), its
times moved onto the collector's clock, and the pieces fed, host with the oldest
front first, into one window. When the window is full it is sorted by (pkt_id,
time) and cut into instances (latency.group_sorted). A packet is complete when
it has not been seen for `gap_ns` behind the slowest host's front (no later event
can still belong to it) or, sooner, when its path is a complete one (not the
start of a longer path seen so far) and every host is `slack_ns` past it. A
complete packet leaves as one row of its path: the first time, the pkt_id and
the time of each segment; open packets stay for the next window. So memory
holds the window (a few MiB of columns) plus ~24 bytes and 8 per segment of each
packet, not the events; and nothing is sorted globally.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field, replace

import numpy as np

from vnet.collector.tracefile import stream_accounting

from .bulk import Batch, Flow, HostEvents, HostReader, files_by_host
from .clocksync import ClockMap, from_pings, hop_traits, refine
from .latency import _MULT, group_sorted, order_by_packet

GAP_NS = 1_000_000_000   # longest quiet time inside one packet's path (and host disorder)
HOP_BITS = 16            # a host's hop indexes are u16: window hop = host << 16 | hop
# How far a host's events may run out of time order (and clocks drift): a reader writes a chunk
# per ring (a ring per CPU), each holding what came since that ring's last read, at most ~100 ms
# before (the recorder's GATHER_DELAY_MS, the agent's SHIP_DELAY_MS); 54 ms measured under a flood.
SLACK_NS = 150_000_000
WINDOW = 1 << 18         # events sorted together (more while many packets are still open)


class PathRows:
    """The packets of one path (hop sequence): one row each, kept as the parts the
    windows produced (first time, pkt_id, segment times), so that nothing copies the
    whole table: the report reads columns and sums part by part."""

    def __init__(self, hops: tuple[int, ...], parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.hops = hops
        self.parts = [p for p in parts if p[0].size]
        self.sizes = [int(p[0].size) for p in self.parts]
        self.count = sum(self.sizes)
        self._first: np.ndarray | None = None
        self._pkt: np.ndarray | None = None
        self._e2e: np.ndarray | None = None

    @property
    def segments(self) -> int:
        return len(self.hops) - 1

    @property
    def first_ts(self) -> np.ndarray:
        """int64: the time at the first hop, collector clock."""
        if self._first is None:
            self._first = _cat([p[0] for p in self.parts], np.int64)
        return self._first

    @property
    def pkt_id(self) -> np.ndarray:
        if self._pkt is None:
            self._pkt = _cat([p[1] for p in self.parts], np.uint64)
        return self._pkt

    def e2e(self) -> np.ndarray:
        if self._e2e is None:
            self._e2e = _cat([p[2].sum(axis=1, dtype=np.int64) if self.segments else np.zeros(p[0].size, np.int64)
                              for p in self.parts], np.int64)
        return self._e2e

    def column(self, i: int) -> np.ndarray:
        """Segment i of every row: a new contiguous array (the caller may reorder it), int32
        when every part holds int32 (half the bytes for the percentiles to go through)."""
        dtype = np.result_type(*[p[2].dtype for p in self.parts]) if self.parts else np.int64
        return _cat([p[2][:, i] for p in self.parts], dtype, copy=True)

    def column_sums(self, rows: np.ndarray | None = None) -> list[int]:
        """Per segment, the sum over all rows (or over the rows where the mask is set)."""
        total = np.zeros(self.segments, np.int64)
        at = 0
        for (_, _, d), n in zip(self.parts, self.sizes):
            total += (d if rows is None else d[rows[at:at + n]]).sum(axis=0, dtype=np.int64)
            at += n
        return [int(x) for x in total]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """The segment times of the rows idx (ascending), as int64 [len(idx), segments]."""
        out = np.empty((idx.size, self.segments), np.int64)
        bounds = np.cumsum([0] + self.sizes)
        part = np.searchsorted(bounds, idx, "right") - 1
        for j in np.unique(part).tolist():
            sel = part == j
            out[sel] = self.parts[j][2][idx[sel] - bounds[j]]
        return out

    def select(self, keep: np.ndarray) -> "PathRows":
        """The rows where keep is set."""
        parts, at = [], 0
        for p, n in zip(self.parts, self.sizes):
            k = keep[at:at + n]
            parts.append((p[0][k], p[1][k], p[2][k]))
            at += n
        return PathRows(self.hops, parts)


def _cat(arrays: list[np.ndarray], dtype, copy: bool = False) -> np.ndarray:
    if not arrays:
        return np.empty(0, dtype)
    if len(arrays) == 1:
        a = arrays[0]
        return a.astype(dtype, copy=True) if copy or a.dtype != dtype or not a.flags.c_contiguous else a
    return np.concatenate(arrays).astype(dtype, copy=False)


@dataclass
class PacketTable:
    """Every packet instance of a trace as rows of its path (most common path first),
    with what the report needs besides: hop names, clocks, drops, sched waits."""

    paths: list[PathRows]
    hop_names: list[str]
    hop_host: np.ndarray          # hop -> host index
    hosts: list[HostEvents]       # headers, files, clocks, problems; no event columns
    error_ns: list[int | None]
    offset_ns: list[int]
    drops: dict[str, np.ndarray] = field(default_factory=dict)   # + "last_hop" (-1: not seen), "first_ts"
    sched: dict[str, np.ndarray] = field(default_factory=dict)
    t_first: int = 0
    t_last: int = 0
    count: int = 0                # packet events read (before --since/--until)
    packet_events: list[int] = field(default_factory=list)      # per host
    late: int = 0                 # events that came after their packet was closed
    clocks: list[ClockMap] = field(default_factory=list)        # per host: onto the collector's clock

    @property
    def t0(self) -> int:
        return self.t_first

    @property
    def packets(self) -> int:
        return sum(p.count for p in self.paths)

    @property
    def events(self) -> int:
        return sum(p.count * len(p.hops) for p in self.paths)

    def instances(self):
        """Every packet's events (latency.Instances), packets in (pkt_id, time) order:
        for exports that write each event (O(events) memory)."""
        from .latency import Instances

        pkt = _cat([p.pkt_id for p in self.paths], np.uint64)
        first = _cat([p.first_ts for p in self.paths], np.int64)
        which = np.repeat(np.arange(len(self.paths)), [p.count for p in self.paths])
        order = np.lexsort((first, pkt))
        sizes = np.array([len(p.hops) for p in self.paths], np.int64)[which][order]
        start = np.r_[0, np.cumsum(sizes)]
        ts = np.empty(int(start[-1]), np.int64)
        hop = np.empty(ts.size, np.uint32)
        base = np.cumsum([0] + [p.count for p in self.paths])
        for j, p in enumerate(self.paths):  # each path's rows, scattered to their places
            mine = np.flatnonzero(which[order] == j)
            rows = order[mine] - base[j]
            times = np.empty((p.count, len(p.hops)), np.int64)
            times[:, 0] = p.first_ts
            if len(p.hops) > 1:
                times[:, 1:] = p.first_ts[:, None] + np.cumsum(p.rows(np.arange(p.count)), axis=1)
            at = start[mine][:, None] + np.arange(len(p.hops))
            ts[at] = times[rows]
            hop[at] = np.array(p.hops, np.uint32)
        return Instances(ts, hop, np.repeat(pkt[order], sizes), start)

    def pair_error(self, a: int, b: int) -> int | None:
        """Bound on the clock error of a time difference between hops a and b."""
        return pair_bound(self.clocks, self.error_ns, int(self.hop_host[a]), int(self.hop_host[b]))


def pair_bound(clocks: list[ClockMap], error_ns: list[int | None], a: int, b: int) -> int | None:
    """Bound on the clock error of a time difference between hosts a and b: one refined
    against the other has its own bound, else the sum (None: unknown)."""
    if a == b:
        return 0
    ea, eb = error_ns[a], error_ns[b]
    if ea is None or eb is None:
        return None
    for x, y in ((a, b), (b, a)):
        if clocks and clocks[y].ref == x:
            return error_ns[y] - error_ns[x]
    return ea + eb


class _Feed:
    """One host's pieces on the collector's clock: decoded here (inline), or ahead in a
    child process (reads, crc32, msgpack and the numpy decode run beside the join;
    threads would share one interpreter lock) that sends each piece's columns over a pipe."""

    def __init__(self, index: int, reader: HostReader, files, process: bool, batch_bytes: int):
        self.index, self.reader = index, reader
        self.front = np.iinfo(np.int64).min   # newest time seen: later events are not much older
        self.done = False
        self.result: HostEvents | None = None
        self.packet_events = 0
        self.staged: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # ts, pkt_id, hop; at: next
        self.at = 0
        self._proc = None
        if process:
            import multiprocessing

            ctx = multiprocessing.get_context("fork")
            self._conn, child = ctx.Pipe(duplex=False)
            self._proc = ctx.Process(target=_decode_in_child, args=(child, reader, files, batch_bytes), daemon=True,
                                     name=f"vnet decode {reader.out.host}")
            self._proc.start()
            child.close()
            self._q: queue.Queue = queue.Queue(maxsize=4)  # bounded: at most a few pieces ahead
            self._closing = False
            self._thread = threading.Thread(target=self._receive, daemon=True,
                                            name=f"vnet receive {reader.out.host}")
            self._thread.start()
        else:
            self._it = reader.batches(files, batch_bytes)

    def staged_left(self) -> int:
        return 0 if self.staged is None else self.staged[0].size - self.at

    def next(self) -> Batch | None:
        if self._proc is None:
            b = next(self._it, None)
            if b is None:
                self.result, self.packet_events = self.reader.finish(), self.reader.packet_events
            return b
        msg = self._q.get()
        if msg[0] == "error":
            raise msg[1]
        if msg[0] == "end":
            self.result, self.packet_events = msg[1], msg[2]
            return None
        _, hop_dtype, drops, raw = msg
        cols = [np.frombuffer(r, dt) for r, dt in zip(raw, (np.int64, np.uint64, hop_dtype))]
        return Batch(*cols, drops)

    def _receive(self) -> None:
        """Drain the child's pipe into a short queue (a thread: it waits in read(), without
        the GIL), so the child decodes the next pieces while the join works."""
        try:
            while True:
                msg = self._conn.recv()
                if msg[0] == "batch":
                    msg = (*msg, [self._conn.recv_bytes() for _ in range(3)])
                if not self._put(msg) or msg[0] != "batch":
                    return
        except (EOFError, OSError):
            self._put(("error", RuntimeError(f"the decoder of host {self.reader.out.host} ended "
                                             f"(exit code {self._proc.exitcode})")))

    def _put(self, msg) -> bool:
        while not self._closing:
            try:
                self._q.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        if self._proc is not None:
            self._closing = True
            if self._proc.is_alive():
                self._proc.terminate()
            self._proc.join(timeout=10)
            self._conn.close()
            self._thread.join(timeout=10)


def _decode_in_child(conn, reader: HostReader, files, batch_bytes: int) -> None:
    """A decoder process: each piece as (meta, then the raw columns), then the host's
    other results; an error is sent as itself (or its words, if it does not pickle)."""
    try:
        for b in reader.batches(files, batch_bytes):
            conn.send(("batch", b.hop.dtype, b.drops))
            for col in (b.ts, b.pkt_id, b.hop):
                conn.send_bytes(np.ascontiguousarray(col))
        conn.send(("end", reader.finish(), reader.packet_events))
    except BrokenPipeError:
        pass
    except BaseException as e:  # noqa: BLE001 - the parent raises it
        try:
            conn.send(("error", e))
        except Exception:  # noqa: BLE001 - it does not pickle
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        conn.close()


class StreamJoin:
    """Feeds → windows → PacketTable (see the module's docstring)."""

    def __init__(self, work: dict, flow: Flow | None = None, gap_ns: int = GAP_NS, window: int = WINDOW,
                 parallel: bool = True, batch_bytes: int = 4 << 20, slack_ns: int = SLACK_NS,
                 clocks: list[ClockMap] | None = None):
        self.gap_ns, self.window, self.batch_bytes = gap_ns, window, batch_bytes
        self.slack_ns = min(slack_ns, gap_ns)
        self.readers = [HostReader(host, files[0].header, flow) for host, files in work.items()]
        self.feeds: list[_Feed] = []
        if clocks is None:
            clocks = []
            for r, files in zip(self.readers, work.values()):
                for f in files:  # the clocks are needed before the first event: found by a scan
                    for c in f.scan(("clock",)):
                        r.add_clock(c)
                clocks.append(from_pings(r.pings))
        for r, files in zip(self.readers, work.values()):
            r.out.files += [str(f.path) for f in files]
            r.out.problems += stream_accounting(files)
        if len(clocks) == 1 and clocks[0].error_ns is None:
            clocks = [replace(clocks[0], error_ns=0)]  # one host: its own timeline, nothing to compare
        self.clocks = clocks
        self.offset_ns = [m.offset_ns for m in clocks]
        self.error_ns = [m.error_ns for m in clocks]
        self.parallel = parallel and (os.cpu_count() or 1) > 1
        self._work = work
        # the window: events not yet closed come first
        self._ts = np.empty(window, np.int64)
        self._pkt = np.empty(window, np.uint64)
        self._hop = np.empty(window, np.uint32)
        self._n = 0
        self.cutoff = np.iinfo(np.int64).min   # every packet seen only before this is closed
        self._next_at = window
        self._complete: list[int] = []         # hashes of paths that are not the start of a longer one
        self.late = 0
        self.t_first, self.t_last, self.count = np.iinfo(np.int64).max, np.iinfo(np.int64).min, 0
        self._paths: dict[int, int] = {}                     # path hash -> path index
        self._path_hops: list[tuple[int, ...]] = []
        self._rows: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
        self._drops: list[dict[str, np.ndarray]] = []        # pending: not matched to a packet yet
        self._matched: list[dict[str, np.ndarray]] = []

    # -- the loop -------------------------------------------------------------------------------------

    def run(self) -> PacketTable:
        for i, (r, clock) in enumerate(zip(self.readers, self.clocks)):
            r.clock, r.hop_base = clock, i << HOP_BITS  # window hop = host index, host's hop index
        self.feeds = [_Feed(i, r, self._work[r.out.host], self.parallel, self.batch_bytes)
                      for i, r in enumerate(self.readers)]
        try:
            while True:
                live = [f for f in self.feeds if self._fill(f)]
                if not live:
                    break
                self._merge(live)
                if self._n >= self._next_at:
                    self._process(final=False)
            self._process(final=True)
        finally:
            for f in self.feeds:
                f.close()
        return self._table()

    def _fill(self, feed: _Feed) -> bool:
        """Give the feed staged events (on the collector's clock, window hop indexes);
        False when it has no more."""
        while not feed.done and feed.staged_left() == 0:
            b = feed.next()
            if b is None:
                feed.done = True
                break
            self._stage(feed, b)
        return not feed.done or feed.staged_left() > 0

    def _stage(self, feed: _Feed, b: Batch) -> None:
        if b.drops is not None and b.drops["ts"].size:
            d = dict(b.drops)
            d["host"] = np.full(d["ts"].size, feed.index, np.int32)
            self._drops.append(d)
        feed.staged = (b.ts, b.pkt_id, b.hop)  # the decoder moved the times and placed the hops
        feed.at = 0

    def _merge(self, live: list[_Feed]) -> None:
        """Move the staged events up to the earliest last time among the feeds into the
        window, merged by time: then a packet's events across hosts enter in time order
        and the window's sort by (pkt_id, input order) rarely needs fixing."""
        horizon = min(int(f.staged[0][-1]) for f in live)
        parts = []
        for f in live:
            ts = f.staged[0]
            end = int(np.searchsorted(ts[f.at:], horizon, "right")) + f.at
            if f.staged[0][-1] == horizon and end < ts.size:  # the feed that set it: all of it
                end = ts.size
            if end > f.at:
                parts.append((f, f.at, end))
        m = sum(e - a for _, a, e in parts)
        n = self._n
        if n + m > self._ts.size:
            self._grow(n + m)
        out_ts, out_pkt, out_hop = self._ts[n:n + m], self._pkt[n:n + m], self._hop[n:n + m]
        if len(parts) == 1:
            f, a, e = parts[0]
            out_ts[:] = f.staged[0][a:e]
            out_pkt[:] = f.staged[1][a:e]
            out_hop[:] = f.staged[2][a:e]
        else:
            cols = [np.concatenate([f.staged[c][a:e] for f, a, e in parts]) for c in range(3)]
            order = np.argsort(cols[0], kind="stable")  # timsort: a merge of sorted runs
            np.take(cols[0], order, out=out_ts)
            np.take(cols[1], order, out=out_pkt)
            np.take(cols[2], order, out=out_hop)
        for f, a, e in parts:
            f.at = e
            f.front = max(f.front, int(f.staged[0][e - 1]))
        self._n = n + m
        if m:
            lo, hi = int(out_ts.min()), int(out_ts.max())
            self.t_first, self.t_last = min(self.t_first, lo), max(self.t_last, hi)
            self.count += m
            if lo < self.cutoff:
                self.late += int(np.count_nonzero(out_ts < self.cutoff))

    def _grow(self, need: int) -> None:
        size = max(need, 2 * self._ts.size)
        for name in ("_ts", "_pkt", "_hop"):
            old = getattr(self, name)
            new = np.empty(size, old.dtype)
            new[:self._n] = old[:self._n]
            setattr(self, name, new)

    def _process(self, final: bool) -> None:
        n = self._n
        if not n:
            return
        fronts = [f.front for f in self.feeds if not f.done]
        front = None if final or not fronts else min(fronts)
        order, pid, ts = order_by_packet(self._pkt[:n], self._ts[:n])
        hop = self._hop[:n][order]
        del order
        inst = group_sorted(pid, ts, hop)
        h = self._path_hash(inst.hop, inst.start[:-1], inst.sizes)
        self._n = 0
        keep = None
        if front is not None:
            # A pkt_id seen within the gap behind the slowest host may see more: its events
            # stay in the window. Unless its instances are all on a complete path (not the
            # start of a longer one) and every host is past it by the slack.
            cutoff, early = front - self.gap_ns, front - self.slack_ns
            gid, first_inst = _groups_of_instances(inst)
            first = inst.start[first_inst]             # each pkt_id's first event
            last = np.maximum.reduceat(inst.ts, first)  # ... and its latest time
            open_id = last >= cutoff
            self.cutoff = max(self.cutoff, cutoff)
            if self._complete and open_id.any():
                on_complete = np.zeros(h.size, bool)
                for key in self._complete:
                    on_complete |= h == np.uint64(key)
                waits = np.zeros(first.size, bool)
                waits[gid[~on_complete]] = True
                open_id &= waits | (last >= early)
                self.cutoff = max(self.cutoff, early)
            if open_id.any():
                lo = first[open_id]
                size = np.r_[first, n][1:][open_id] - lo
                ev = np.repeat(lo - np.cumsum(size) + size, size) + np.arange(int(size.sum()))
                k = ev.size
                self._ts[:k], self._pkt[:k], self._hop[:k] = inst.ts[ev], inst.pkt_id[ev], inst.hop[ev]
                self._n = k
                keep = ~open_id[gid]
        # next time when the window has twice what stays open (else a long gap re-sorts it often)
        self._next_at = max(self.window, 2 * self._n)
        self._close(inst, h, keep)

    # -- closed packets ---------------------------------------------------------------------------------

    def _close(self, inst, h: np.ndarray, keep: np.ndarray | None) -> None:
        """The window's instances (those in `keep`: the others' packets are still open)
        become rows of their paths; h: their path hashes."""
        starts, sizes = inst.start[:-1], inst.sizes
        if self._drops:
            self._match_drops(inst, keep)
        if keep is not None:
            h, starts, sizes = h[keep], starts[keep], sizes[keep]
        for key, rows in _groups(h):
            st = starts[rows]
            k = int(sizes[rows[0]])
            p = self._paths.get(key)
            if p is None:
                p = self._paths[key] = len(self._path_hops)
                self._path_hops.append(tuple(inst.hop[st[0]:st[0] + k].tolist()))
                self._rows.append([])
                self._complete = _complete_paths(self._paths, self._path_hops)
            if k > 1:
                t = inst.ts[st[:, None] + np.arange(k)]
                d = np.diff(t, axis=1)
                if d.size and -(1 << 31) <= int(d.min()) and int(d.max()) < 1 << 31:
                    d = d.astype(np.int32)  # half the memory; sums still run in int64
                first = t[:, 0].copy()
            else:
                d = np.empty((st.size, 0), np.int64)
                first = inst.ts[st]
            self._rows[p].append((first, inst.pkt_id[st], d))

    def _path_hash(self, hop: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """sum over an instance's events k of (hop + 1) * MULT^(k + 1) (mod 2^64), xor
        its size << 56; hop in window numbering (the table renames at the end)."""
        h = np.zeros(starts.size, np.uint64)
        live = None  # None: every instance (all have a first event)
        mult, weight, k = int(_MULT), 1, 0
        while True:
            weight = weight * mult & 0xFFFFFFFFFFFFFFFF  # MULT^(k + 1), wrapping
            at = starts + k if live is None else starts[live] + k
            term = hop[at].astype(np.uint64)
            term += np.uint64(1)
            term *= np.uint64(weight)
            if live is None:
                h += term
            else:
                h[live] += term
            k += 1
            more = sizes > k if live is None else sizes[live] > k
            if live is None:
                if more.all():
                    continue
                live = np.flatnonzero(more)
            else:
                live = live[more]
            if not live.size:
                break
        h ^= sizes.astype(np.uint64) << np.uint64(56)
        return h

    def _match_drops(self, inst, keep: np.ndarray | None) -> None:
        """Each pending drop whose packet closed here: the last hop it was seen at before
        it was freed (in the first instance of its pkt_id)."""
        d = {k: np.concatenate([x[k] for x in self._drops]) for k in self._drops[0]}
        firsts = inst.pkt_id[inst.start[:-1]]
        i = np.searchsorted(firsts, d["pkt_id"])
        np.minimum(i, max(firsts.size - 1, 0), out=i)
        hit = firsts[i] == d["pkt_id"] if firsts.size else np.zeros(i.size, bool)
        if keep is not None and firsts.size:
            hit &= keep[i]
        last = np.full(hit.size, -1, np.int64)
        first_ts = np.zeros(hit.size, np.int64)
        for j in np.flatnonzero(hit).tolist():
            lo, hi = int(inst.start[i[j]]), int(inst.start[i[j] + 1])
            before = np.flatnonzero(inst.ts[lo:hi] <= d["ts"][j])
            first_ts[j] = inst.ts[lo]
            if before.size:
                last[j] = int(inst.hop[lo + before[-1]])
            else:
                last[j] = -2  # its packet, but freed before the first hop: not seen either
        if hit.any():
            self._matched.append({**{k: v[hit] for k, v in d.items()}, "last_hop": last[hit],
                                  "first_ts": first_ts[hit]})
        self._drops = [{k: v[~hit] for k, v in d.items()}] if not hit.all() else []

    # -- the end ------------------------------------------------------------------------------------------

    def _table(self) -> PacketTable:
        hosts = [f.result for f in self.feeds]
        multi = len(hosts) > 1
        names, hop_host, canon_of = [], [], {}
        for i, h in enumerate(hosts):
            for k, name in enumerate(h.hops):
                canon_of[(i, k)] = len(names)
                names.append(f"[{h.host}] {name}" if multi else name)
                hop_host.append(i)
        canon = {(i << HOP_BITS) | k: c for (i, k), c in canon_of.items()}
        paths = [PathRows(tuple(int(canon[h]) for h in hops), parts)
                 for hops, parts in zip(self._path_hops, self._rows) if parts]
        drops = self._matched + [{**d, "last_hop": np.full(d["ts"].size, -1, np.int64),
                                  "first_ts": np.zeros(d["ts"].size, np.int64)} for d in self._drops]
        keys = ("ts", "pkt_id", "reason", "host", "last_hop", "first_ts")
        dtypes = (np.int64, np.uint64, np.uint32, np.int32, np.int64, np.int64)
        drop_cols = {k: (np.concatenate([d[k] for d in drops]) if drops else np.empty(0, t))
                     for k, t in zip(keys, dtypes)}
        lh = drop_cols["last_hop"]
        drop_cols["last_hop"] = np.array([canon[x] if x >= 0 else x for x in lh.tolist()], np.int64)
        sched: dict[str, list] = {}
        for i, (h, clock) in enumerate(zip(hosts, self.clocks)):
            h.clock = clock.describe() if clock.source != "none" else None
            for k, v in h.sched.items():
                sched.setdefault(k, []).append(clock.to_collector(v.astype(np.int64)) if k == "ts" else v)
            sched.setdefault("host", []).append(np.full(h.sched["ts"].size, i, np.int32))
        counts = [f.packet_events for f in self.feeds]
        return PacketTable(paths, names, np.array(hop_host, np.int32), hosts, self.error_ns, self.offset_ns,
                           drop_cols, {k: np.concatenate(v) for k, v in sched.items()},
                           int(self.t_first) if self.count else 0, int(self.t_last) if self.count else 0,
                           self.count, counts, self.late, self.clocks)


def _groups_of_instances(inst) -> tuple[np.ndarray, np.ndarray]:
    """Each instance's pkt_id group (instances of one pkt_id are adjacent), and each
    group's first instance."""
    ipk = inst.pkt_id[inst.start[:-1]]
    new = np.empty(ipk.size, bool)
    new[:1] = True
    np.not_equal(ipk[1:], ipk[:-1], out=new[1:])
    gid = np.cumsum(new)
    gid -= 1
    return gid, np.flatnonzero(new)


def _complete_paths(paths: dict[int, int], hops: list[tuple[int, ...]]) -> list[int]:
    """The hashes of the known paths that no longer known path starts with."""
    return [key for key, i in paths.items()
            if not any(len(o) > len(hops[i]) and o[:len(hops[i])] == hops[i] for o in hops)]


def _groups(h: np.ndarray):
    """(value, indexes) for each distinct value of h: a pass per value while there are
    few (a window holds a handful of paths), np.unique for the rest."""
    idx = None  # None: all of h
    for _ in range(8):
        vals = h if idx is None else h[idx]
        if not vals.size:
            return
        same = vals == vals[0]
        yield int(vals[0]), (np.flatnonzero(same) if idx is None else idx[same])
        idx = np.flatnonzero(~same) if idx is None else idx[~same]
    if idx.size:
        uniq, inv = np.unique(h[idx], return_inverse=True)
        order = np.argsort(inv, kind="stable")
        cuts = np.r_[0, np.cumsum(np.bincount(inv, minlength=uniq.size))]
        for j, key in enumerate(uniq.tolist()):
            yield int(key), idx[order[cuts[j]:cuts[j + 1]]]


def path_hash(hops: tuple[int, ...]) -> int:
    """The path hash of a hop sequence (StreamJoin._path_hash's formula), in Python: it orders
    paths of equal count in the report."""
    h, w = 0, 1
    for hop in hops:
        w = w * int(_MULT) & 0xFFFFFFFFFFFFFFFF
        h = (h + (hop + 1) * w) & 0xFFFFFFFFFFFFFFFF
    return h ^ ((len(hops) & 0xFF) << 56)


def _reuse_freed_memory() -> None:
    """Ask glibc to keep freed blocks of up to 32 MiB for reuse instead of unmapping them:
    the window's temporaries are a few MiB each, allocated again every window, and a page
    the process touches for the first time costs ~2.7 s/GB on these VMs (page faults)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD: larger blocks only are mmapped
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep this much free heap
    except (OSError, AttributeError):
        pass  # not glibc: only slower


def read_table(paths, *, flow: Flow | None = None, hosts: list[str] | None = None, gap_ns: int = GAP_NS,
               window: int = WINDOW, parallel: bool = True, batch_bytes: int = 4 << 20,
               slack_ns: int = SLACK_NS, clocks: list[ClockMap] | None = None,
               sync_clocks: bool = True) -> PacketTable:
    """The packets of the trace files named (directories expanded), joined as a stream.
    With several hosts the pings' clocks are then refined by the table's own packets
    that cross between hosts (sync_tables), unless clocks are given or sync_clocks is off."""
    _reuse_freed_memory()
    table = StreamJoin(files_by_host(paths, hosts), flow, gap_ns, window, parallel, batch_bytes, slack_ns,
                       clocks).run()
    if clocks is None and sync_clocks:
        sync_tables([table])
    return table


def sync_tables(tables: list[PacketTable]) -> None:
    """Refine the hosts' clocks with the packets of all these tables (joins of the same
    files, e.g. requests and replies) and put every table on them (retime)."""
    if not tables or len(tables[0].clocks) < 2:
        return
    synced = refine(tables[0].clocks, *tables)
    for t in tables:
        retime(t, synced)


def clock_maps(paths, hosts: list[str] | None = None, **opts) -> list[ClockMap]:
    """Each host's clock map (clocksync), in files_by_host's order, as read_table makes it
    for the whole trace (every packet, no flow)."""
    return read_table(paths, hosts=hosts, **opts).clocks


def retime(table: PacketTable, clocks: list[ClockMap]) -> None:
    """Move a joined table onto other clocks, in place: each hop's times by its host's
    change. Each packet seen on two hosts or more is then put in causal order (causal:
    the time order, except where the pair's clock bound cannot tell), and a packet whose
    hops change order moves to the path of its new order (the rows of a path stay in time
    order only per part, as joined). Given the table's own clocks, only that order is made."""
    from .causal import orders

    old = table.clocks
    if len(old) != len(clocks):
        return

    def change(h: int, t: np.ndarray) -> np.ndarray:
        """Collector-time t of host h: how much earlier it becomes (int64)."""
        host_t = old[h].host_times(t)
        return (ClockMap.offsets(clocks[h], host_t) - ClockMap.offsets(old[h], host_t)).astype(np.int64)

    moved = [h for h in range(len(clocks)) if clocks[h] is not old[h]]
    roles, after = hop_traits(table.hop_names)
    errors = [m.error_ns for m in clocks]

    def bound(a: int, b: int) -> int | None:
        return pair_bound(clocks, errors, a, b)

    merged: dict[tuple[int, ...], list] = {}
    for p in table.paths:
        hosts = table.hop_host[list(p.hops)]
        multi = np.unique(hosts).size > 1
        if not multi and not np.isin(hosts, moved).any():
            merged.setdefault(p.hops, []).extend(p.parts)
            continue
        cols = list(p.hops)
        still = multi and not np.isin(hosts, moved).any()   # its times as joined: each row in time order
        if still:
            cross = np.flatnonzero(hosts[1:] != hosts[:-1])
            lim = [bound(int(hosts[i]), int(hosts[i + 1])) for i in cross]
        for first, pkt, d in p.parts:
            if still:   # the rows whose every host change is certain keep their order, unsolved
                if None in lim:
                    ok = np.zeros(first.size, bool)
                else:
                    ok = (d[:, cross] > np.array(lim, np.int64)).all(axis=1)
                if ok.all():
                    merged.setdefault(p.hops, []).append((first, pkt, d))
                    continue
                if ok.any():
                    merged.setdefault(p.hops, []).append((first[ok], pkt[ok], d[ok]))
                    first, pkt, d = first[~ok], pkt[~ok], d[~ok]
            t = np.empty((first.size, len(p.hops)), np.int64)
            t[:, 0] = first
            if p.segments:
                np.cumsum(d, axis=1, dtype=np.int64, out=t[:, 1:])
                t[:, 1:] += first[:, None]
            for h in moved:
                on = np.flatnonzero(hosts == h)
                if on.size:
                    t[:, on] -= change(h, t[:, on])
            if multi:
                order = orders(t, hosts, roles[cols], after[cols], bound)
            else:
                order = np.argsort(t, axis=1, kind="stable")
            same = (order == np.arange(len(p.hops))).all(axis=1)
            if same.all():
                merged.setdefault(p.hops, []).append((t[:, 0].copy(), pkt, np.diff(t, axis=1)))
                continue
            if same.any():
                merged.setdefault(p.hops, []).append((t[same, 0].copy(), pkt[same], np.diff(t[same], axis=1)))
            rest = np.flatnonzero(~same)
            o, tr = order[rest], np.take_along_axis(t[rest], order[rest], axis=1)
            hop_seq = np.asarray(p.hops)[o]
            for seq in np.unique(hop_seq, axis=0):
                r = (hop_seq == seq).all(axis=1)
                merged.setdefault(tuple(int(x) for x in seq), []).append(
                    (tr[r, 0].copy(), pkt[rest][r], np.diff(tr[r], axis=1)))
    table.paths = sorted((PathRows(h, parts) for h, parts in merged.items()), key=lambda r: -r.count)
    if not moved:
        return
    for h in moved:
        for cols in (table.drops, table.sched):
            if cols.get("ts") is not None and cols["ts"].size:
                mine = cols["host"] == h
                cols["ts"][mine] -= change(h, cols["ts"][mine])
    firsts = [p.first_ts for p in table.paths if p.count]
    if firsts:
        table.t_first = min(int(f.min()) for f in firsts)
    table.clocks = list(clocks)
    table.offset_ns = [m.offset_ns for m in clocks]
    table.error_ns = [m.error_ns for m in clocks]
    for h, m in zip(table.hosts, clocks):
        h.clock = m.describe() if m.source != "none" else None


def causal_order(table: PacketTable) -> None:
    """Each packet seen on two hosts or more in causal order on the table's own clocks
    (retime's second half: the time order, except where a pair's bound cannot tell)."""
    retime(table, table.clocks)


def without_hops(table: PacketTable, names) -> PacketTable:
    """The table with the events at the named hops left out (exact hop names): a hop that
    fires at a misleading time (a deferred free, a probe on a path's far side) would
    otherwise end or split paths. Paths that become equal are merged; a packet seen at
    dropped hops only is gone."""
    drop = {i for i, n in enumerate(table.hop_names) if n in set(names)}
    if not drop:
        return table
    merged: dict[tuple[int, ...], list] = {}
    for p in table.paths:
        keep = [i for i, h in enumerate(p.hops) if h not in drop]
        if not keep:
            continue
        hops = tuple(p.hops[i] for i in keep)
        if len(keep) == len(p.hops):
            merged.setdefault(hops, []).extend(p.parts)
            continue
        for first, pkt, d in p.parts:
            t = np.empty((first.size, len(p.hops)), np.int64)
            t[:, 0] = first
            np.cumsum(d, axis=1, dtype=np.int64, out=t[:, 1:]) if p.segments else None
            t[:, 1:] += first[:, None]
            t = t[:, keep]
            merged.setdefault(hops, []).append((t[:, 0].copy(), pkt, np.diff(t, axis=1)))
    paths = [PathRows(h, parts) for h, parts in merged.items()]
    out = PacketTable(**{f: getattr(table, f) for f in PacketTable.__dataclass_fields__})
    out.paths = paths
    return out
