"""Rebuild each packet's journey: events that share a pkt_id, ordered by time."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class PacketPath:
    pkt_id: str
    events: list[dict] = field(default_factory=list)

    @property
    def hops(self) -> list[str]:
        return [e["probe"] for e in self.events]

    @property
    def total_ns(self) -> int:
        return self.events[-1]["ts_ns"] - self.events[0]["ts_ns"] if self.events else 0

    def deltas(self) -> list[tuple[str, str, int]]:
        """(from probe, to probe, ns) for each consecutive pair of hops."""
        return [(a["probe"], b["probe"], b["ts_ns"] - a["ts_ns"]) for a, b in zip(self.events, self.events[1:])]


def paths(events: list[dict]) -> list[PacketPath]:
    """Group events by pkt_id, each group in time order; groups in order of first sighting."""
    by_id: dict[str, PacketPath] = {}
    for e in events:
        by_id.setdefault(e["pkt_id"], PacketPath(e["pkt_id"])).events.append(e)
    for p in by_id.values():
        p.events.sort(key=lambda e: e["ts_ns"])
    return sorted(by_id.values(), key=lambda p: p.events[0]["ts_ns"])


def hop_latency(paths_: list[PacketPath]) -> list[tuple[str, str, int, float, int]]:
    """Per (from, to) hop: number of packets, median ns, max ns, in path order."""
    samples: dict[tuple[str, str], list[int]] = {}
    for p in paths_:
        for a, b, ns in p.deltas():
            samples.setdefault((a, b), []).append(ns)
    return [(a, b, len(v), statistics.median(v), max(v)) for (a, b), v in samples.items()]


class PathFollower:
    """Live path assembly for `vnet trace --follow`: a packet's path is complete
    when it has been seen at every attached hook, or when `idle_ns` pass with no
    new sighting (its other hooks are not on its way)."""

    def __init__(self, hooks: int, idle_ns: int = 200_000_000):
        self.hooks = hooks
        self.idle_ns = idle_ns
        self._open: dict[str, PacketPath] = {}
        self._last: dict[str, int] = {}

    def add(self, events: list[dict], now_ns: int) -> list[PacketPath]:
        """Take new events (packet events only; others are ignored) and return
        the paths completed by them or by the passing time, oldest first."""
        done = []
        for e in events:
            pid = e.get("pkt_id")
            if pid is None:
                continue
            path = self._open.setdefault(pid, PacketPath(pid))
            path.events.append(e)
            self._last[pid] = now_ns
            if len({x["probe"] for x in path.events}) >= self.hooks:
                done.append(self._close(pid))
        expired = [pid for pid, t in self._last.items() if now_ns - t >= self.idle_ns]
        done += [self._close(pid) for pid in expired]
        return sorted(done, key=lambda p: p.events[0]["ts_ns"])

    def flush(self) -> list[PacketPath]:
        """Every path still open (at the end of a trace)."""
        return sorted((self._close(pid) for pid in list(self._open)), key=lambda p: p.events[0]["ts_ns"])

    def _close(self, pid: str) -> PacketPath:
        path = self._open.pop(pid)
        self._last.pop(pid, None)
        path.events.sort(key=lambda e: e["ts_ns"])
        return path


def path_record(path: PacketPath) -> dict:
    """A packet's path as one JSON-ready object."""
    first = path.events[0]
    hops, prev = [], first["ts_ns"]
    for e in path.events:
        hops.append({"probe": e["probe"], "ts_ns": e["ts_ns"], "delta_ns": e["ts_ns"] - prev,
                     **({"ifname": e["ifname"], "netns": e["netns"]} if e.get("ifname") else {})})
        prev = e["ts_ns"]
    return {"pkt_id": path.pkt_id, "proto": first["proto"], "src": first["src"], "dst": first["dst"],
            "sport": first["sport"], "dport": first["dport"], "len": first["len"], "wall_ns": first["wall_ns"],
            "hops": hops, "total_ns": path.total_ns}


def format_path(path: PacketPath) -> str:
    """One line: time, tuple, then each hop with the time since the previous one."""
    r = path_record(path)
    secs, ns = divmod(r["wall_ns"], 1_000_000_000)
    ends = (f"{r['src']}:{r['sport']} > {r['dst']}:{r['dport']}" if r["sport"] is not None
            else f"{r['src']} > {r['dst']}" if r["src"] else "")
    hops = " -> ".join(f"{h['probe'].removeprefix('dev:')}" + (f" +{h['delta_ns'] / 1000:.1f}us" if i else "")
                       for i, h in enumerate(r["hops"]))
    return (f"{secs}.{ns:09d} {(r['proto'] or '?').upper()} {ends} pkt_id {r['pkt_id']}: {hops}"
            f"  total {r['total_ns'] / 1000:.1f}us")


def retransmissions(events: list[dict]) -> list[tuple[dict, dict]]:
    """TCP segments sent again: the same (5-tuple, seq, length) under a new
    pkt_id (a retransmission carries a new IP ID). Pairs of (first, again) as
    seen at the first hook each was seen at."""
    first_seen: dict[tuple, dict] = {}
    pairs = []
    for e in sorted(events, key=lambda e: e["ts_ns"]):
        if e.get("proto") != "tcp" or "tcp_seq" not in e:
            continue
        key = (e["src"], e["sport"], e["dst"], e["dport"], e["tcp_seq"], e["len"], e["tcp_flags"])
        seen = first_seen.get(key)
        if seen is None:
            first_seen[key] = e
        elif seen["pkt_id"] != e["pkt_id"] and e["probe"] == seen["probe"]:
            pairs.append((seen, e))
            first_seen[key] = e
    return pairs
