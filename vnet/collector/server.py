"""`vnet collect`: receive numbered chunks from any number of agents at once and
write them, per trace and per host, to trace files (vnet/collector/tracefile.py).

A chunk is written before it is acknowledged, so an agent only forgets what is
on disk. A restarted collector finds what it already has and tells the agent
where to resume; a sequence number that never arrives is recorded as a gap.
Each agent's clock is measured against ours with ping/pong exchanges, each written
as a "clock" chunk (offset at the middle of the exchange, bound half its round trip);
the analysis fits offset and drift through them (vnet.analysis.clocksync).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vnet.protocol import MAX_DATA_BYTES, Channel
from vnet.protocol.channel import ProtocolError

from .tracefile import TraceFileReader, TraceFileWriter

log = logging.getLogger("vnet.collector")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CLOCK_PINGS = 8          # exchanges right after an agent connects
CLOCK_EVERY_S = 5.0      # and one this often afterwards (drift)
COLLECTOR_KINDS = ("header", "gap", "clock")  # chunks only the collector writes


@dataclass
class Stream:
    """One (trace, host): its files and what has been written."""

    trace: str
    host: str
    directory: Path
    header: dict
    rotate_bytes: int | None
    last_seq: int = -1
    gaps: list = field(default_factory=list)
    chunks: int = 0
    events: int = 0
    writer: TraceFileWriter | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    best_clock: dict | None = None

    @property
    def base(self) -> Path:
        return self.directory / f"{self.host}.vnt"

    def open(self) -> None:
        """A new segment: after a restart the old files stay as they are."""
        n = 0
        while (path := self.base if n == 0 else self.base.with_name(f"{self.base.name}.s{n}")).exists():
            n += 1
        self.writer = TraceFileWriter(path, self.header, rotate_bytes=self.rotate_bytes)

    def resume(self) -> None:
        """What earlier segments (a collector run that ended or crashed) already hold."""
        for path in sorted(self.directory.glob(f"{self.host}.vnt*")):
            try:
                for chunk in TraceFileReader(path).chunks():
                    seq = chunk.get("seq")
                    if isinstance(seq, int) and chunk.get("kind") not in ("header",):
                        self.last_seq = max(self.last_seq, seq)
            except Exception as e:  # noqa: BLE001 - a damaged file: resume from what was readable
                log.warning("%s: %s", path, e)


class Collector:
    def __init__(self, out_dir: str | Path, rotate_bytes: int | None = None):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rotate_bytes = rotate_bytes
        self.streams: dict[tuple[str, str], Stream] = {}
        self._lock = threading.Lock()

    def _stream(self, trace: str, host: str, header: dict) -> Stream:
        for what, name in (("trace", trace), ("host", host)):
            if not isinstance(name, str) or not SAFE_NAME.match(name):
                raise ProtocolError(f"bad {what} name {name!r}")
        with self._lock:
            st = self.streams.get((trace, host))
            if st is None:
                directory = self.out / trace
                directory.mkdir(parents=True, exist_ok=True)
                st = Stream(trace, host, directory, header, self.rotate_bytes)
                st.resume()
                self.streams[(trace, host)] = st
            return st

    def handle(self, ch: Channel) -> None:
        """One agent connection: open, then chunks until it closes or goes away."""
        ch.limit = MAX_DATA_BYTES
        msg = ch.recv(("open",))
        header = msg.get("header")
        if not isinstance(header, dict):
            raise ProtocolError("open without a header")
        st = self._stream(msg.get("trace"), msg.get("host"), header)
        with st.lock:
            if st.writer is None:
                st.open()
        ch.send({"type": "opened", "have": st.last_seq, "path": str(st.base)})
        log.info("%s/%s from %s: resuming after chunk %d", st.trace, st.host, ch.peer, st.last_seq)
        stop = threading.Event()
        pinger = threading.Thread(target=self._ping, args=(ch, stop), daemon=True, name=f"clock {st.host}")
        pinger.start()
        try:
            while True:
                m = ch.recv(("chunk", "pong", "close"))
                if m["type"] == "pong":
                    self._clock(st, m)
                elif m["type"] == "chunk":
                    self._chunk(st, m)
                    ch.send({"type": "ack", "seq": st.last_seq})
                else:
                    self._finish(st)
                    ch.send({"type": "closed", "path": str(st.base), "gaps": st.gaps, "chunks": st.chunks})
                    return
        finally:
            stop.set()

    def _chunk(self, st: Stream, m) -> None:
        """An agent's chunk: its head (a map) in the message, an events chunk's records
        raw beside it (m.blob, a view of the receive buffer), written from there."""
        seq, chunk, blob = m.get("seq"), m.get("chunk"), m.blob
        if not isinstance(seq, int) or not isinstance(chunk, dict):
            raise ProtocolError("malformed chunk")
        if chunk.get("seq") != seq or not isinstance(chunk.get("kind"), str) or "records" in chunk:
            raise ProtocolError(f"chunk {seq} does not match its envelope")
        if (blob is not None) != (chunk["kind"] == "events"):
            raise ProtocolError(f"chunk {seq}: an events chunk comes with its records, and only it")
        if chunk["kind"] in COLLECTOR_KINDS:  # forged ones would fake gaps, clocks or the record layout
            raise ProtocolError(f"chunk {seq}: kind {chunk['kind']!r} is the collector's to write")
        if any(not isinstance(k, str) or k == "self" for k in chunk):  # they become keyword arguments
            raise ProtocolError(f"chunk {seq}: field names must be strings")
        count = chunk.get("count", 0)
        if chunk["kind"] == "events" and (not isinstance(count, int) or count < 0):
            raise ProtocolError(f"chunk {seq}: an events chunk's count must be a whole number, got {count!r}")
        if blob is not None:
            chunk["records"] = blob  # last: written where it is (vnet/packing.py), not copied
        with st.lock:
            if seq <= st.last_seq:
                return  # sent again after a reconnect: already written
            if seq > st.last_seq + 1:
                gap = (st.last_seq + 1, seq - 1)
                st.gaps.append(gap)
                self._writer(st).write("gap", first=gap[0], last=gap[1])
                log.error("%s/%s: chunks %d..%d never arrived", st.trace, st.host, *gap)
            kind = chunk.pop("kind")
            self._writer(st).write(kind, **chunk)
            st.last_seq = seq
            st.chunks += 1
            st.events += count if kind == "events" else 0

    def _ping(self, ch: Channel, stop: threading.Event) -> None:
        n = 0
        while not stop.is_set():
            try:
                ch.send({"type": "ping", "t": time.monotonic_ns()})
            except Exception:  # noqa: BLE001 - the connection ended
                return
            n += 1
            stop.wait(0.05 if n < CLOCK_PINGS else CLOCK_EVERY_S)

    def _clock(self, st: Stream, m: dict) -> None:
        t1 = time.monotonic_ns()
        t0, agent = m.get("t"), m.get("mono_ns")
        if not isinstance(t0, int) or not isinstance(agent, int) or t1 < t0:
            return
        rtt = t1 - t0
        sample = {"offset_ns": agent - (t0 + t1) // 2, "error_ns": rtt // 2, "at_ns": t1,
                  "agent_real_ns": m.get("real_ns"), "agent_mono_ns": agent,
                  "collector_real_ns": time.time_ns(), "collector_mono_ns": t1}
        with st.lock:  # every sample: the analysis fits the drift through the best of each window
            if st.best_clock is None or sample["error_ns"] <= st.best_clock["error_ns"]:
                st.best_clock = sample
            self._writer(st).write("clock", **sample)

    @staticmethod
    def _writer(st: Stream) -> TraceFileWriter:
        """The stream's open file (under st.lock); a new segment when another connection
        for the same trace and host has closed it meanwhile."""
        if st.writer is None:
            st.open()
        return st.writer

    def _finish(self, st: Stream) -> None:
        with st.lock:
            if st.writer is not None:
                st.writer.close()
                st.writer = None

    def close(self) -> None:
        for st in list(self.streams.values()):
            self._finish(st)
