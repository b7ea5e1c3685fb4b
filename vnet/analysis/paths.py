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
