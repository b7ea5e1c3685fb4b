"""`vnet trace -w FILE`: a started Trace recorded to a trace file, the format the
collector writes (vnet/collector/tracefile.py), straight from the ring in
batches: bytes in, bytes out, no event decoded on the way."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vnet.binding.ringbatch import DISCARD_BIT, HDR_SIZE, LEN_MASK, RingBatchReader

from .session import Trace

BATCH_RECORDS = 65536
DRAIN_POLL_MS = 20  # the drain's timer, as the agent's (vnet/agent/agent.py says why)
# Under a steady flow a reader that drains at once writes what came during its last write:
# ~150 KB, thousands of appends a second, each a direct write that waits for the device.
# It lets up to GATHER_BYTES gather first (for at most GATHER_DELAY_MS since its last batch),
# still woken by the programs' forced wakeup at a quarter of the ring: about half the
# reader's CPU under a flood (docs/benchmarks.md). --immediate-mode: drain at once.
GATHER_BYTES = 1 << 20
GATHER_DELAY_MS = 100


@dataclass
class Recorded:
    events: int = 0
    chunks: int = 0
    path: str = ""
    direct_io: bool = False  # written around the page cache


def cut(blob: bytes | memoryview, n: int) -> bytes | memoryview:
    """The first n records of a batch blob (for -c: exactly that many in the file)."""
    pos, seen = 0, 0
    while seen < n and pos < len(blob):
        (len_flags,) = struct.unpack_from("=I", blob, pos)
        pos += ((len_flags & LEN_MASK) + HDR_SIZE + 7) & ~7
        seen += not len_flags & DISCARD_BIT
    return blob[:pos]


def record(trace: Trace, path: Path, *, ending: Callable[[], bool], count: int | None,
           trace_name: str | None = None, vanished: list[dict] | None = None, direct_io: bool = True,
           immediate: bool = False) -> Recorded:
    """Until ending() or `count` events: batches from the ring into `path`, then
    the kernel's counters and the losses in a final chunk. `vanished`: where ending()
    puts traced interfaces that went away (vanished_fields); each becomes a chunk, as
    an agent's do at the collector. direct_io: whole blocks around the page cache where
    the file system can, as the collector writes: under a flood, plain writes cost the
    reader more CPU per event and lose far more events to a full ring (docs/benchmarks.md).
    immediate: each batch written as soon as it is read, none left to gather."""
    from vnet.collector.tracefile import TraceFileWriter, header_for_trace, stats_fields

    reader = RingBatchReader(trace.objects[0].maps["vnet_events"])
    out = Recorded(path=str(path))
    with TraceFileWriter(path, header_for_trace(trace, trace_name=trace_name or path.stem),
                         direct=direct_io) as writer:
        # At most the programs' mark: their forced wakeup then always finds it there (0: they
        # force one at every check, and the reader takes what is there at once).
        want = 0 if immediate else min(GATHER_BYTES, reader.size // 8, trace.wakeup["wakeup_bytes"])

        peeked = 0.0  # when the last batch was taken: what is pending since came after (the first at once)

        def take(everything: bool = False) -> bool:
            nonlocal peeked
            while True:
                peeked = time.monotonic()
                batch = reader.peek(max_records=BATCH_RECORDS)  # written from the ring itself, not copied
                if not batch.count:
                    reader.consume(batch)  # discarded records only, if anything
                    if batch.nbytes:
                        continue  # it stopped at the ring's end: more may follow from its start
                    return False
                data, n = batch.data, batch.count
                if count is not None and out.events + n >= count:
                    n = count - out.events
                    data = cut(data, n)
                writer.write("events", seq=out.chunks, count=n, records=data)
                del data
                reader.consume(batch)
                out.events += n
                out.chunks += 1
                if count is not None and out.events >= count:
                    return True
                if not everything and reader.pending() < want:
                    return False  # what came during that write: let more gather (the loop below)

        noted = 0

        def note() -> None:
            nonlocal noted
            for v in (vanished or [])[noted:]:
                writer.write("vanished", **v)
                noted += 1

        while not ending():
            note()
            if not reader.wait(DRAIN_POLL_MS) or reader.hold(want, time.monotonic() - peeked,
                                                              GATHER_DELAY_MS, DRAIN_POLL_MS):
                continue
            if take():
                break
        else:
            take(everything=True)
        note()
        stats = trace.stats()
        writer.write("stats", seq=out.chunks, **stats_fields(trace))
        writer.write("end", seq=out.chunks + 1, events=out.events, chunks=out.chunks,
                     losses={"kernel_ring_full": stats.lost},
                     kernel={"seen": stats.seen, "emitted": stats.emitted, "lost": stats.lost,
                             "filtered": stats.filtered}, mono_ns=time.monotonic_ns())
        out.direct_io = writer.direct_io  # to the end (a device that refused a direct write turns it off)
    trace.received += out.events
    return out
