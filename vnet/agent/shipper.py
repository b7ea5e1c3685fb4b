"""Numbered chunks from an agent to the collector, none lost.

Every chunk gets the next sequence number and stays queued until the collector
acknowledges it (acks are cumulative). While the collector is unreachable the
queue grows in memory up to `memory_bytes`, then on disk in `spool_dir` up to
`spool_bytes`; past that a chunk is dropped and its events are counted as lost
at the agent (the only way an agent loses data, and it says so). On reconnect
the collector says which sequence it has; everything after is sent again.
"""

from __future__ import annotations

import collections
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack

from vnet.protocol import MAX_DATA_BYTES, connect
from vnet.protocol.channel import ProtocolError

log = logging.getLogger("vnet.agent.shipper")
RECONNECT_S = 0.5


_SPOOL_HEAD = struct.Struct(">I")  # a spooled chunk: head length, msgpack head, records


@dataclass
class _Entry:
    seq: int
    events: int
    head: dict | None = None      # in memory: {"kind", "seq", ...} and
    blob: bytes | None = None     # the records (events chunks), or
    path: Path | None = None      # spooled to disk
    size: int = 0

    def load(self) -> tuple[dict, bytes | None]:
        if self.path is None:
            return self.head, self.blob
        data = memoryview(self.path.read_bytes())
        (n,) = _SPOOL_HEAD.unpack_from(data)
        head = msgpack.unpackb(data[4:4 + n], raw=False)
        return head, (data[4 + n:] if data.nbytes > 4 + n else None)


@dataclass
class ShipperStats:
    queued: int = 0          # chunks waiting for an ack
    sent: int = 0            # chunks written to the collector (resends included)
    acked: int = 0           # highest sequence number the collector has
    spooled: int = 0         # chunks that went to disk
    dropped_chunks: int = 0  # spool full: gone, and counted
    dropped_events: int = 0
    reconnects: int = 0
    connected: bool = False
    last_error: str = ""
    path: str = ""           # where the collector writes this stream


class Shipper:
    def __init__(self, address: str, key: bytes, opening: dict, *, spool_dir: str | os.PathLike,
                 memory_bytes: int = 64 << 20, spool_bytes: int = 1 << 30):
        self.address = address
        self.key = key
        self.opening = opening       # the "open" message's fields: trace, host, header
        self.spool_dir = Path(spool_dir)
        self.memory_bytes = memory_bytes
        self.spool_bytes = spool_bytes
        self.stats = ShipperStats()
        self._queue: collections.deque[_Entry] = collections.deque()
        self._next_seq = 0
        self._in_memory = 0
        self._on_disk = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shipper", daemon=True)
        self._thread.start()

    # -- producer side ------------------------------------------------------------------------------
    def put(self, kind: str, events: int = 0, records=None, **fields) -> int:
        """Queue a chunk; returns its sequence number. `records` (an events chunk's ring
        batch, any buffer) is copied once, here, and shipped raw beside the chunk's head:
        the collector writes it to the trace file as the chunk's last field, "records"."""
        with self._cond:
            seq = self._next_seq
            self._next_seq += 1
            head = {"kind": kind, "seq": seq, **fields}
            blob = bytes(records) if records is not None else None
            size = len(msgpack.packb(head, use_bin_type=True)) + (len(blob) if blob is not None else 0)
            entry = _Entry(seq, events, size=size)
            if self._in_memory + size <= self.memory_bytes:
                entry.head, entry.blob = head, blob
                self._in_memory += size
            elif self._on_disk + size <= self.spool_bytes:
                self.spool_dir.mkdir(parents=True, exist_ok=True)
                entry.path = self.spool_dir / f"chunk-{seq:012d}"
                packed = msgpack.packb(head, use_bin_type=True)
                entry.path.write_bytes(_SPOOL_HEAD.pack(len(packed)) + packed + (blob or b""))
                self._on_disk += size
                self.stats.spooled += 1
            else:
                self.stats.dropped_chunks += 1
                self.stats.dropped_events += events
                log.error("spool full (%d bytes): chunk %d with %d events dropped", self.spool_bytes, seq, events)
                # The collector must not wait for it: a marker says what is gone.
                head = {"kind": "dropped", "seq": seq, "events": events}
                entry = _Entry(seq, 0, head=head, size=64)
                self._in_memory += entry.size
            self._queue.append(entry)
            self.stats.queued = len(self._queue)
            self._cond.notify_all()
        return seq

    def flush(self, timeout: float) -> bool:
        """Wait until the collector has every chunk queued so far (True) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            last = self._next_seq - 1
            while self.stats.acked < last and time.monotonic() < deadline:
                self._cond.wait(0.1)
            return self.stats.acked >= last

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=5)

    # -- the connection -----------------------------------------------------------------------------
    def _ack(self, seq: int) -> None:
        with self._cond:
            self.stats.acked = max(self.stats.acked, seq)
            while self._queue and self._queue[0].seq <= seq:
                e = self._queue.popleft()
                if e.path is not None:
                    self._on_disk -= e.size
                    e.path.unlink(missing_ok=True)
                else:
                    self._in_memory -= e.size
            self.stats.queued = len(self._queue)
            self._cond.notify_all()

    def _run(self) -> None:
        self.stats.acked = -1
        while not self._stop.is_set():
            try:
                self._session()
            except (OSError, ConnectionError, ProtocolError, TimeoutError) as e:
                self.stats.connected = False
                if str(e) != self.stats.last_error:
                    log.warning("collector %s: %s (retrying; chunks queue meanwhile)", self.address, e)
                self.stats.last_error = str(e)
                self._stop.wait(RECONNECT_S)
            except Exception:  # noqa: BLE001
                log.exception("shipper failed; retrying")
                self._stop.wait(RECONNECT_S)

    def _session(self) -> None:
        ch = connect(self.address, self.key, "collector", limit=MAX_DATA_BYTES, timeout=10)
        try:
            reply = ch.request({"type": "open", **self.opening}, ("opened",))
            have = int(reply.get("have", -1))  # the last sequence the collector wrote before
            self.stats.path = str(reply.get("path", ""))
            self._ack(have)
            self.stats.connected = True
            self.stats.reconnects += 1
            reader = threading.Thread(target=self._read_acks, args=(ch,), name="shipper-acks", daemon=True)
            reader.start()
            sent_upto = have
            while not self._stop.is_set() and reader.is_alive():
                with self._cond:
                    pending = [e for e in self._queue if e.seq > sent_upto]
                    if not pending:
                        self._cond.wait(0.2)
                        continue
                for e in pending:
                    head, blob = e.load()
                    ch.send({"type": "chunk", "seq": e.seq, "chunk": head}, blob=blob)
                    self.stats.sent += 1
                    sent_upto = e.seq
        finally:
            ch.close()

    def _read_acks(self, ch) -> None:
        try:
            while True:
                msg = ch.recv(("ack", "ping"))
                if msg["type"] == "ack":
                    self._ack(int(msg["seq"]))
                else:  # the collector measures our clock: answer at once
                    ch.send({"type": "pong", "t": msg.get("t"), "mono_ns": time.monotonic_ns(),
                             "real_ns": time.time_ns()})
        except Exception as e:  # noqa: BLE001 - the session loop reconnects
            log.info("collector connection ended: %s", e)
