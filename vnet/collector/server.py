"""`vnet collect`: receive numbered chunks from any number of agents at once and
write them, per trace and per host, to trace files (vnet/collector/tracefile.py).

A chunk is written before it is acknowledged, so an agent only forgets what is
on disk. A restarted collector finds what it already has and tells the agent
where to resume; a sequence number that never arrives is recorded as a gap.
Each agent's clock is measured against ours with ping/pong exchanges, each written
as a "clock" chunk (offset at the middle of the exchange, bound half its round trip);
the analysis fits offset and drift through them (vnet.analysis.clocksync).

A stream is (trace, host, run): the agent names each run of a trace, so the same
spec run again lands in a new file segment instead of being taken for a resend.
A stream its agent has ended is forgotten (a later open resumes from its files); the
others, cut off or still sending, each hold an open file: at most `max_streams` of
them, so that a key holder opening stream after stream cannot take every file
descriptor or the memory. Past it a new stream is refused with the reason; its agent
keeps its chunks and tries again (back-off), and the refusals are counted.

When a chunk cannot be written (disk full, I/O error) the collector does not
acknowledge it: it answers "full" with the last chunk it has, the file stays as it
was (a torn chunk is cut off), and the agent keeps the chunk and everything after
it and sends them again later (vnet/agent/shipper.py). Nothing is lost while the
agent's queue and spool hold out; the refusals are counted and logged, and the
summary at exit says how long writing failed. A clock sample that cannot be
written is only counted (the next one replaces it).

Per connection, two stages: the connection's thread receives a chunk, verifies its MAC and
envelope and frames it for the trace file (CRC-32), then hands it to a writer thread, which
writes it (whole blocks around the page cache where it can: tracefile.py) and acknowledges it
(or answers "full"), while the next one is received, verified and framed. The records stay in
the channel's receive buffers (BufferRing, PIPELINE_DEPTH of them) until written; each stage
leaves the GIL in its long calls (recv_into, GMAC in libcrypto, CRC-32 in libdeflate or zlib,
pwrite).
"""

from __future__ import annotations

import collections
import logging
import queue
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from vnet.protocol import MAX_DATA_BYTES, Channel
from vnet.protocol.channel import BufferRing, ProtocolError

from .tracefile import MAX_CLOCK_NS, TraceFileReader, TraceFileWriter

log = logging.getLogger("vnet.collector")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CLOCK_PINGS = 8          # exchanges right after an agent connects
CLOCK_EVERY_S = 5.0      # and one this often afterwards (drift)
PONG_MAX_AGE_NS = 60_000_000_000  # a pong later than this answers no ping worth a sample
PIPELINE_DEPTH = 3       # receive buffers per connection: one being received, up to two verified or being written
MAX_STREAMS = 256        # streams not ended by their agent (each holds a file open); --max-streams
FINISHED_KEPT = 1000     # summary lines of ended streams kept for the exit summary (the rest counted)
COLLECTOR_KINDS = ("header", "gap", "clock")  # chunks only the collector writes


@dataclass
class Stream:
    """One (trace, host): its files and what has been written."""

    trace: str
    host: str
    directory: Path
    header: dict
    rotate_bytes: int | None
    direct_io: bool = True       # write around the page cache where the file system can
    last_seq: int = -1
    gaps: list = field(default_factory=list)
    chunks: int = 0
    events: int = 0
    run: str | None = None
    path: Path | None = None
    writer: TraceFileWriter | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    best_clock: dict | None = None
    write_error: str = ""        # set while writing fails (disk full): why
    refused: int = 0             # chunks not acknowledged because they could not be written
    full_since: float | None = None
    full_seconds: float = 0.0
    clocks_unwritten: int = 0
    interrupted: bool = False
    connections: int = 0         # connections serving it now (under Collector._lock)

    @property
    def base(self) -> Path:
        return self.directory / f"{self.host}.vnt"

    def open(self) -> None:
        """A new segment: after a restart, or for another run, the old files stay as they are."""
        n = 0
        while (path := self.base if n == 0 else self.base.with_name(f"{self.base.name}.s{n}")).exists():
            n += 1
        self.writer = TraceFileWriter(path, self.header, rotate_bytes=self.rotate_bytes, direct=self.direct_io)
        self.path = path
        if self.direct_io and not self.writer.direct_io:
            log.info("%s: no direct I/O on this file system: written through the page cache", path)

    def resume(self) -> None:
        """What earlier segments of this run (a collector run that ended or crashed) already hold."""
        for path in sorted(self.directory.glob(f"{self.host}.vnt*")):
            try:
                reader = TraceFileReader(path)
                if reader.header is None or reader.header.get("run") != self.run:
                    continue
                for chunk in reader.chunks():
                    seq = chunk.get("seq")
                    if isinstance(seq, int) and chunk.get("kind") not in ("header",):
                        self.last_seq = max(self.last_seq, seq)
            except Exception as e:  # noqa: BLE001 - a damaged file: resume from what was readable
                log.warning("%s: %s", path, e)

    def failed(self, e: OSError) -> None:
        """A write failed: the chunk is not acknowledged (the agent keeps it)."""
        self.refused += 1
        if not self.write_error:
            self.full_since = time.monotonic()
            log.error("%s/%s: cannot write after chunk %d: %s; the agent keeps its chunks and sends them "
                      "again", self.trace, self.host, self.last_seq, e)
        self.write_error = e.strerror or str(e)

    def wrote(self) -> None:
        if self.write_error:
            took = time.monotonic() - (self.full_since or time.monotonic())
            self.full_seconds += took
            log.warning("%s/%s: writing again after %.1f s (%d chunks refused so far)", self.trace, self.host,
                        took, self.refused)
            self.write_error, self.full_since = "", None

    def summary(self) -> str:
        out = f"{self.trace}/{self.host}: {self.chunks} chunks, {self.events} events in {self.path}"
        if self.gaps:
            out += f"; chunks never received: {', '.join(f'{a}..{b}' for a, b in self.gaps)}"
        if self.refused:
            still = f", STILL FAILING ({self.write_error})" if self.write_error else ""
            out += (f"; could not write for {self.full_seconds:.1f} s: {self.refused} chunks refused and kept "
                    f"by the agent{still}")
        if self.clocks_unwritten:
            out += f"; {self.clocks_unwritten} clock samples not written"
        if self.interrupted:
            out += "; the agent died mid-trace (recorded in the file)"
        return out


class StreamLimit(ProtocolError):
    """A new stream past max_streams: refused (the agent keeps its chunks and retries)."""


class Collector:
    def __init__(self, out_dir: str | Path, rotate_bytes: int | None = None, max_streams: int = MAX_STREAMS,
                 direct_io: bool = True):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rotate_bytes = rotate_bytes
        self.direct_io = direct_io
        self.max_streams = max_streams
        self.streams: dict[tuple[str, str, str | None], Stream] = {}  # not ended by their agent
        self.finished: collections.deque[str] = collections.deque(maxlen=FINISHED_KEPT)  # ended: summary lines
        self.finished_count = 0
        self.refused_streams = 0
        self._lock = threading.Lock()

    def _stream(self, trace: str, host: str, run, header: dict) -> Stream:
        for what, name in (("trace", trace), ("host", host)):
            if not isinstance(name, str) or not SAFE_NAME.match(name):
                raise ProtocolError(f"bad {what} name {name!r}")
        if run is not None and (not isinstance(run, str) or not SAFE_NAME.match(run)):
            raise ProtocolError(f"bad run name {run!r}")
        with self._lock:
            st = self.streams.get((trace, host, run))
            if st is None:
                if len(self.streams) >= self.max_streams:
                    self.refused_streams += 1
                    if self.refused_streams == 1 or self.refused_streams % 100 == 0:
                        log.error("refused a new stream %s/%s: %d streams are open, the limit (--max-streams); "
                                  "%d refused so far", trace, host, len(self.streams), self.refused_streams)
                    raise StreamLimit(f"collector refuses a new stream: {len(self.streams)} streams are open, "
                                      f"its limit (--max-streams)")
                directory = self.out / trace
                directory.mkdir(parents=True, exist_ok=True)
                st = Stream(trace, host, directory, dict(header, run=run) if run else header, self.rotate_bytes,
                            direct_io=self.direct_io, run=run)
                st.resume()
                self.streams[(trace, host, run)] = st
            st.connections += 1
            return st

    def _release(self, st: Stream, ended: bool) -> None:
        """A connection for `st` is over. A stream its agent ended, served by no other
        connection, is closed and forgotten (its summary line kept)."""
        with self._lock:
            st.connections -= 1
            key = (st.trace, st.host, st.run)
            ended = ended or st.interrupted  # a dead agent's stream, resent by its successor: over too
            idle = st.connections == 0
            if not ended or st.connections > 0 or self.streams.get(key) is not st:
                ended = False
            else:
                del self.streams[key]
        if not ended:
            if idle:
                with st.lock:  # open, but nobody sends to it now: its write stage goes back
                    if st.writer is not None:
                        st.writer.trim()
            return
        self._finish(st)
        self.finished.append(st.summary())
        self.finished_count += 1

    def handle(self, ch: Channel) -> None:
        """One agent connection: open, then chunks until it closes or goes away."""
        ch.limit = MAX_DATA_BYTES
        msg = ch.recv(("open",))
        header = msg.get("header")
        if not isinstance(header, dict):
            raise ProtocolError("open without a header")
        try:
            st = self._stream(msg.get("trace"), msg.get("host"), msg.get("run"), header)
        except StreamLimit as e:  # the agent says why and retries (back-off)
            ch.send({"type": "error", "message": str(e)})
            raise
        ended = False
        try:
            with st.lock:
                if st.writer is None:
                    try:
                        st.open()
                    except OSError as e:  # a full disk here: the agent says why and retries (back-off)
                        ch.send({"type": "error", "message": f"collector cannot create {st.base}: {e.strerror or e}"})
                        raise
            ended = self._serve(ch, st)
        finally:
            self._release(st, ended)

    def _serve(self, ch: Channel, st: Stream) -> bool:
        """Chunks until the agent ends the stream (True) or the connection goes."""
        ch.send({"type": "opened", "have": st.last_seq, "path": str(st.path)})
        log.info("%s/%s from %s: resuming after chunk %d", st.trace, st.host, ch.peer, st.last_seq)
        stop = threading.Event()
        pinger = threading.Thread(target=self._ping, args=(ch, stop), daemon=True, name=f"clock {st.host}")
        pinger.start()
        writer = _ChunkWriter(self, st, ch)
        try:
            while True:
                m = ch.recv(("chunk", "pong", "close", "interrupted"))
                if m["type"] == "chunk":
                    self._check_chunk(m)
                    m.frame = self._frame(m)
                    writer.put(m)  # written, then acknowledged (or refused: "full"), by the writer
                    continue
                if m.buffer is not None:
                    ch.buffers.give(m.buffer)
                if m["type"] == "pong":
                    self._clock(st, m)
                elif m["type"] == "interrupted":
                    writer.put(m)  # after the chunks before it
                else:
                    writer.finish()  # everything before "close" written and answered
                    self._finish(st)
                    ch.send({"type": "closed", "path": str(st.path), "gaps": st.gaps, "chunks": st.chunks})
                    return True
        except (ConnectionError, OSError, ProtocolError):
            writer.reraise()  # the writer's failure (it closed the connection), not its symptom here
            raise
        finally:
            stop.set()
            writer.stop()

    def _write(self, st: Stream, ch: Channel, m) -> None:
        """The writer thread's part of one message: write, then answer."""
        if m["type"] == "interrupted":
            try:
                self._interrupted(st, m)
                ch.send({"type": "recorded", "seq": st.last_seq})
            except OSError as e:
                ch.send({"type": "full", "have": st.last_seq, "message": e.strerror or str(e)})
            return
        try:
            if self._chunk(st, m):
                ch.send({"type": "ack", "seq": st.last_seq})
        except OSError as e:  # not written: not acknowledged; the agent sends it again
            ch.send({"type": "full", "have": st.last_seq, "message": e.strerror or str(e)})

    @staticmethod
    def _check_chunk(m) -> None:
        """An agent's chunk: its head (a map) in the message, an events chunk's records
        raw beside it (m.blob, a view of a receive buffer). Checked before it is queued,
        so that a malformed one closes the connection as it arrives."""
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

    @staticmethod
    def _frame(m) -> list:
        """A checked chunk as the trace file's frame (TraceFileWriter.frame; CRC-32 computed),
        an events chunk's records last: written where they are (vnet/packing.py), not copied."""
        fields = {k: v for k, v in m["chunk"].items() if k not in ("kind", "seq")}
        if m.blob is not None:
            fields["records"] = m.blob
        return TraceFileWriter.frame(m["chunk"]["kind"], m["seq"], **fields)

    def _chunk(self, st: Stream, m) -> bool:
        """Write a checked, framed chunk (the writer thread). Whether to acknowledge;
        OSError when it could not be written (nothing changed)."""
        seq, chunk = m["seq"], m["chunk"]
        kind = chunk["kind"]
        with st.lock:
            if seq <= st.last_seq:
                return True  # sent again after a reconnect: already written
            if st.write_error and seq != st.last_seq + 1:
                return False  # sent before the agent heard "full": it sends them again
            try:
                if seq > st.last_seq + 1:
                    gap = (st.last_seq + 1, seq - 1)
                    self._writer(st).write("gap", first=gap[0], last=gap[1])
                    st.gaps.append(gap)
                    st.last_seq = seq - 1  # recorded as missing: a retry of this chunk is not a new gap
                    log.error("%s/%s: chunks %d..%d never arrived", st.trace, st.host, *gap)
                self._writer(st).write_frame(m.frame, seq)
            except OSError as e:
                st.failed(e)
                raise
            st.wrote()
            st.last_seq = seq
            st.chunks += 1
            st.events += chunk.get("count", 0) if kind == "events" else 0  # a whole number: checked
            return True

    def _interrupted(self, st: Stream, m) -> None:
        """A restarted agent resent what its dead predecessor had spooled: the stream ends here
        without the agent's own end (what that agent read but had not spooled is missing)."""
        reason = m.get("reason")
        fields = {"reason": str(reason)[:1000] if reason else "", "after": st.last_seq}
        kernel = _kernel_counters(m.get("kernel"))
        if kernel is not None:  # the dead agent's kernel counters, as they stood when it died
            fields["kernel"] = kernel
        else:
            unknown = m.get("kernel_unknown") or ("malformed counters" if m.get("kernel") is not None
                                                  else "not reported (an older agent)")
            fields["kernel_unknown"] = str(unknown)[:1000]
        with st.lock:
            try:
                self._writer(st).write("interrupted", **fields)
            except OSError as e:
                st.failed(e)
                raise
            st.wrote()
            st.interrupted = True
            log.error("%s/%s: interrupted after chunk %d: %s", st.trace, st.host, st.last_seq, reason)

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
        if not isinstance(t0, int) or not isinstance(agent, int) or not 0 <= t1 - t0 <= PONG_MAX_AGE_NS \
                or abs(agent) >= MAX_CLOCK_NS:
            return  # not an answer to a recent ping of ours, or no clock value (int64 analysis)
        rtt = t1 - t0
        sample = {"offset_ns": agent - (t0 + t1) // 2, "error_ns": rtt // 2, "at_ns": t1,
                  "agent_real_ns": m.get("real_ns"), "agent_mono_ns": agent,
                  "collector_real_ns": time.time_ns(), "collector_mono_ns": t1}
        with st.lock:  # every sample: the analysis fits the drift through the best of each window
            if st.best_clock is None or sample["error_ns"] <= st.best_clock["error_ns"]:
                st.best_clock = sample
            if st.writer is None or st.write_error:
                st.clocks_unwritten += 1
                return
            try:
                st.writer.write("clock", **sample)
            except OSError:  # disk full: the next sample replaces it
                st.clocks_unwritten += 1

    @staticmethod
    def _writer(st: Stream) -> TraceFileWriter:
        """The stream's open file (under st.lock); a new segment when another connection
        for the same trace and host has closed it meanwhile (OSError: cannot create it)."""
        if st.writer is None:
            st.open()
        return st.writer

    def _finish(self, st: Stream) -> None:
        with st.lock:
            if st.writer is not None:
                st.writer.close()
                st.writer = None

    def close(self) -> list[str]:
        """Close every file; one summary line per stream (what was written, what could not be)."""
        lines = []
        if self.finished_count > len(self.finished):
            lines.append(f"{self.finished_count - len(self.finished)} earlier ended streams (not listed)")
        lines += self.finished
        for st in list(self.streams.values()):
            self._finish(st)
            lines.append(st.summary())
        if self.refused_streams:
            lines.append(f"refused {self.refused_streams} new streams: {self.max_streams} were open, the limit "
                         f"(--max-streams); their agents kept their chunks and tried again")
        return lines


def _kernel_counters(k) -> dict | None:
    """An agent's kernel counters as the file keeps them: the four counts, whole and not
    negative, and whether they stopped at the agent's death; None when malformed."""
    if not isinstance(k, dict):
        return None
    out = {}
    for name in ("seen", "emitted", "lost", "filtered"):
        v = k.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return None
        out[name] = v
    out["frozen"] = k.get("frozen") is not False
    return out


class _ChunkWriter:
    """The second stage of one connection: writes the chunks the connection's thread has
    received and verified, in order, and answers each only once it is written ("ack") or
    could not be ("full"): an ack lets the agent forget the chunk. Any other failure closes
    the connection; the connection's thread then raises it (reraise()), as it did when it
    wrote the chunks itself."""

    def __init__(self, collector: Collector, st: Stream, ch: Channel):
        self.collector, self.st, self.ch = collector, st, ch
        ch.buffers = BufferRing(PIPELINE_DEPTH)
        self._queue: queue.Queue = queue.Queue(maxsize=PIPELINE_DEPTH)  # + blob-less messages, bounded too
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"writer {st.host}")
        self._thread.start()

    def put(self, m) -> None:
        while True:
            self.reraise()
            try:
                self._queue.put(m, timeout=0.1)
                return
            except queue.Full:
                continue

    def reraise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (m := self._queue.get()) is not None:
            try:
                if self.error is None:
                    self.collector._write(self.st, self.ch, m)
            except BaseException as e:  # noqa: BLE001 - handed to the connection's thread
                self.error = e
                self.ch.buffers.abort(e)
                try:  # wake the connection's thread from its recv
                    self.ch.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            finally:
                if m.buffer is not None:
                    self.ch.buffers.give(m.buffer)

    def finish(self) -> None:
        """Until every message queued is written and answered; its failure if one failed."""
        self.stop()
        self.reraise()

    def stop(self) -> None:
        if self._thread.is_alive():
            while self._thread.is_alive():
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self._thread.join()
