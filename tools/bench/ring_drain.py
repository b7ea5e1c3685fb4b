#!/usr/bin/env python3
"""How fast user space empties the event ring: RingBatchReader (one copy per
batch) against RingBuffer (libbpf's ring_buffer__consume, one Python callback
per record), side by side on the same events.

Each round fills the ring with the real tc program (BPF_PROG_TEST_RUN with a
repeat count, nobody reading meanwhile) and times one drain of all of it; the
median of the rounds is reported. Timings are of this machine at this moment:
compare the ratios, not the absolute numbers. Needs root.

Usage: ring_drain.py [EVENTS_PER_ROUND] [ROUNDS]   (default 100000 7)
"""

from __future__ import annotations

import statistics
import struct
import sys
import time
from typing import Callable

from vnet.binding import BpfObject, RingBuffer
from vnet.binding.ringbatch import RingBatchReader, records, walk
from vnet.objects import object_path

FRAME = (b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"  # Ethernet, IPv4 UDP 10.0.0.1 -> 10.0.0.2
         + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 36, 1, 0x4000, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
         + struct.pack("!HHHH", 4000, 5000, 16, 0) + b"ring-bench")


def load(ring_bytes: int) -> BpfObject:
    obj = BpfObject(object_path("tc_trace"))
    obj.set_config("tc_cfg", {"probe_id": 1, "wakeup_every": 1 << 30})
    obj.keep_programs(["vnet_tc_ingress"])
    obj.maps["vnet_events"].max_entries = ring_bytes
    obj.load()
    return obj


def repacked(reader: RingBatchReader) -> int:
    """The other framing considered for Batch.data: u32 length + record per record,
    built after the same walk. Kept here to show what it would cost."""
    m = reader._m
    cons, prod = m.cons_pos[0], m.prod_pos[0]
    start = m.page + (cons & reader._mask)
    pos, count, _ = walk(m.words, start, prod - cons)
    out = bytearray()
    for rec in records(m.ring[start:start + pos]):
        out += struct.pack("=I", len(rec)) + rec
        out += bytes(-len(out) % 8)
    m.cons_pos[0] = cons + pos
    return count


def measure(obj: BpfObject, n: int, rounds: int, drain: Callable[[], int]) -> float:
    """Median seconds per event of `drain` over the rounds."""
    prog = obj.programs["vnet_tc_ingress"]
    drain()  # start empty
    per_event = []
    for _ in range(rounds):
        prog.test_run(FRAME, repeat=n)
        t0 = time.perf_counter()
        got = drain()
        dt = time.perf_counter() - t0
        if got != n:
            raise SystemExit(f"drained {got} events, expected {n} (ring too small?)")
        per_event.append(dt / n)
    return statistics.median(per_event)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    with load(ring_bytes=1 << max(22, (n * 160).bit_length())) as obj:
        batch = RingBatchReader(obj.maps["vnet_events"])
        libbpf = RingBuffer(obj.maps["vnet_events"])

        def batches(cap: int | None) -> Callable[[], int]:
            def drain() -> int:
                total = 0
                while (b := batch.read(max_records=cap)).count:
                    total += b.count
                return total
            return drain

        def batches_split() -> int:  # a consumer that wants each record (the collector's decode)
            total = 0
            while (b := batch.read()).count:
                total += sum(1 for _ in records(b.data))
            return total

        ways = [("RingBuffer (libbpf callback)", lambda: len(libbpf.drain())),
                ("RingBatchReader, one batch", batches(None)),
                ("RingBatchReader, 4096-record batches", batches(4096)),
                ("RingBatchReader + records() split", batches_split),
                ("walk + u32-length repack (not used)", lambda: repacked(batch))]
        results = [(name, measure(obj, n, rounds, drain)) for name, drain in ways]
    base = results[0][1]
    print(f"{n} events per round, {rounds} rounds, median; record = 152 ring bytes")
    print(f"{'reader':<40} {'events/s':>12} {'us/event':>9} {'speedup':>8}")
    for name, s in results:
        print(f"{name:<40} {1 / s:>12,.0f} {s * 1e6:>9.3f} {base / s:>7.1f}x")


if __name__ == "__main__":
    main()
