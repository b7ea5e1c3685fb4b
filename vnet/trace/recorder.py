"""`vnet trace -w FILE`: a started Trace recorded to a trace file, the format the
collector writes (vnet/collector/tracefile.py), straight from the ring in
batches: bytes in, bytes out, no event decoded on the way."""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vnet.binding.ringbatch import DISCARD_BIT, HDR_SIZE, LEN_MASK

from .session import Trace

log = logging.getLogger("vnet.trace")

BATCH_RECORDS = 65536
DRAIN_POLL_MS = 20  # the drain's timer, as the agent's (vnet/agent/agent.py says why)
# Under a steady flow a reader that drains at once writes what came during its last write:
# ~150 KB, thousands of appends a second, each a direct write that waits for the device.
# Gathering, it lets up to GATHER_BYTES come first (for at most GATHER_DELAY_MS since its
# last batch), still woken by the programs' forced wakeup at a quarter of the ring: about
# half the reader's CPU under a flood. That CPU matters when the CPUs are busy: it is then
# taken from the traced path (an OVS switch's threads). While CPU is idle it costs the path
# nothing, and draining at once keeps the ring emptiest for a burst. So, as adaptive
# interrupt coalescing does, "auto" gathers only while the machine has had less than
# GATHER_BELOW_IDLE of a CPU idle, and drains at once again above DRAIN_ABOVE_IDLE
# (docs/benchmarks.md). --immediate-mode: always at once.
GATHER_BYTES = 1 << 20
GATHER_DELAY_MS = 100
IDLE_SAMPLE_S = 0.1
GATHER_BELOW_IDLE = 0.05  # CPUs' worth of idle time over a sample
DRAIN_ABOVE_IDLE = 0.15
MODES = ("auto", "gather", "immediate")
_HZ = os.sysconf("SC_CLK_TCK")


class IdleCpus:
    """How many CPUs' worth of time the machine spent idle (idle and iowait in /proc/stat)
    over the last IDLE_SAMPLE_S or more: None until the first sample is complete."""

    def __init__(self) -> None:
        self.value: float | None = None
        self._at, self._ticks = time.monotonic(), self._read()

    @staticmethod
    def _read() -> int:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait ...
        return int(fields[4]) + int(fields[5])

    def update(self) -> float | None:
        now = time.monotonic()
        if now - self._at >= IDLE_SAMPLE_S:
            ticks = self._read()
            self.value = (ticks - self._ticks) / _HZ / (now - self._at)
            self._at, self._ticks = now, ticks
        return self.value


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
           mode: str = "auto") -> Recorded:
    """Until ending() or `count` events: batches from the ring into `path`, then
    the kernel's counters and the losses in a final chunk. `vanished`: where ending()
    puts traced interfaces that went away (vanished_fields); each becomes a chunk, as
    an agent's do at the collector. direct_io: whole blocks around the page cache where
    the file system can, as the collector writes: under a flood, plain writes cost the
    reader more CPU per event and lose far more events to a full ring (docs/benchmarks.md).
    mode: "gather" lets events gather in the ring between writes, "immediate" writes each
    batch as soon as it is read, "auto" gathers only while the CPUs are busy (above)."""
    from vnet.collector.tracefile import TraceFileWriter, header_for_trace, stats_fields

    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    group = trace.batch_reader()
    out = Recorded(path=str(path))
    with TraceFileWriter(path, header_for_trace(trace, trace_name=trace_name or path.stem),
                         direct=direct_io) as writer:
        gather_bytes = trace.gather_bytes(GATHER_BYTES)
        want = gather_bytes if mode == "gather" else 0
        idle = IdleCpus() if mode == "auto" else None

        peeked = 0.0  # when the last batch was taken: what is pending since came after (the first at once)

        def take(everything: bool = False) -> bool:
            """A batch from each ring (every ring's each round: their chunks in the file stay
            within a round's time of each other); `everything`: until every ring is empty.
            True when `count` events are in."""
            nonlocal peeked
            peeked = time.monotonic()
            while True:
                wrote = False
                for _, reader, batch in group.batches(BATCH_RECORDS):  # written from the ring itself, not copied
                    data, n = batch.data, batch.count
                    if count is not None and out.events + n >= count:
                        n = count - out.events
                        data = cut(data, n)
                    writer.write("events", seq=out.chunks, count=n, records=data)
                    del data
                    reader.consume(batch)
                    out.events += n
                    out.chunks += 1
                    wrote = True
                    if count is not None and out.events >= count:
                        return True
                if not (everything and wrote):
                    return False  # the loop below: the ending, the idle CPU, and whether to let more gather

        noted = 0

        def note() -> None:
            nonlocal noted
            for v in (vanished or [])[noted:]:
                writer.write("vanished", **v)
                noted += 1

        while not ending():
            note()
            if idle is not None and (cpus := idle.update()) is not None:
                if want and cpus > DRAIN_ABOVE_IDLE:
                    want = 0
                    log.debug("%.2f CPUs idle: writing each batch at once", cpus)
                elif not want and cpus < GATHER_BELOW_IDLE:
                    want = gather_bytes
                    log.debug("%.2f CPUs idle: letting events gather between writes", cpus)
            if not group.wait(DRAIN_POLL_MS) or group.hold(want, time.monotonic() - peeked,
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
