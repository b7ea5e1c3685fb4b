"""Numbered chunks from an agent to the collector, none lost.

Every chunk gets the next sequence number and stays queued until the collector
acknowledges it (acks are cumulative). While the collector is unreachable the
queue grows in memory up to `memory_bytes`, then on disk in `spool_dir` up to
`spool_bytes`; past that a chunk is dropped and its events are counted as lost
at the agent (the only way an agent loses data, and it says so). On reconnect
the collector says which sequence it has; everything after is sent again.

"In memory" is a mapped file on tmpfs (`queue_dir/queue`, the agent's --queue-dir,
vnet/agent/queuefile.py) when there is one: it outlives a killed process, as the heap does
not, at the same memory and CPU. The agent takes a batch out of its ring only once its
chunk is there, so a kill loses nothing that was read; without it the chunks are heap copies.

Faults (docs/reliability.md):
- the line goes silent (network cut): no ack and no ping for SESSION_TIMEOUT_S ends the
  session; reconnects back off from RECONNECT_S to RECONNECT_MAX_S; the queue grows
  meanwhile and drains from where the collector's files end.
- the collector cannot write (disk full): it says "full" instead of acknowledging;
  the chunk and everything after stay queued (memory, then spool) and are sent again
  every FULL_RETRY_S .. FULL_RETRY_MAX_S until they are written: nothing is lost while
  the agent's own queue and spool hold out.
- the agent dies: the spool folder keeps the stream's opening (`open`) and whatever was
  spooled, the queue file what was queued, and bpffs its ring with what it had not read
  and its kernel counters (vnet/agent/counters.py). `recover()` (the next agent's start)
  resends the chunks, reads the ring out from where the last queued chunk ended into new
  chunks, and has the collector record that the stream was interrupted, with the counters.
  What only a heap queue held (no queue file) is a gap, counted exactly from them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack

from vnet.errors import VnetError
from vnet.protocol import MAX_DATA_BYTES, connect

from . import counters
from .queuefile import QueueFile, Slot

log = logging.getLogger("vnet.agent.shipper")
RECONNECT_S = 0.5        # first retry after a failed session, doubling up to
RECONNECT_MAX_S = 5.0    # this: a collector down for long is tried every 5 s, not hammered
SESSION_TIMEOUT_S = 15.0  # the collector pings every 5 s: this long without a word, the line is dead
FULL_RETRY_S = 1.0       # a collector that could not write: the same chunk again after this,
FULL_RETRY_MAX_S = 5.0   # doubling up to this
FULL_FLUSH_S = 5.0       # stopping, a collector that cannot write is waited for this long
OPEN_FILE = "open"       # the stream's opening, beside its spooled chunks
RING_BATCH_MAX = 65536   # recovering: records per chunk read out of a dead agent's ring
QUEUE_FILE = "queue"     # the memory queue's file in the queue folder (vnet/agent/queuefile.py)
# A chunk's ring_end names its ring too (a trace has one per CPU): the ring's index in the
# bits above RING_POSITION_BITS, the position (bytes ever read from it) below. One integer,
# as the queue file and the chunk files have always kept: ring 0's marks are plain positions.
RING_POSITION_BITS = 56


def ring_mark(ring: int, position: int) -> int:
    """The ring_end of a chunk that ends at `position` of ring number `ring`."""
    return ring << RING_POSITION_BITS | position


def ring_unmark(mark: int) -> tuple[int, int]:
    """(ring, position) of a ring_end."""
    return mark >> RING_POSITION_BITS, mark & ((1 << RING_POSITION_BITS) - 1)


class _RingUnreadable(Exception):
    """A dead agent's ring that was opened but could not be read out."""


_SPOOL_HEAD = struct.Struct(">I")  # a chunk's file: head length, msgpack head, records
LOCAL = "_local"  # in a file's head, what only this agent's successor needs (never shipped)


# A backlog that filled the memory queue leaves the freed chunk copies in the heap (glibc
# keeps them: an allocation of that size then comes from the heap, not a mapping of its
# own), or the queue file's pages on tmpfs: given back once the queue has been empty for
# TRIM_IDLE_S. A fixed mmap threshold would do it per chunk instead, at +0.15 us of agent CPU
# per event (measured); this is once per backlog. Not at once: a burst that comes back soon
# finds its pages (a fresh one costs the reader a page allocation), and the last ack of a
# backlog is not held up by ~30 ms of freeing 150 MB (drain.py). The shipper's thread gives
# the queue file's pages back TRIM_STEP_BYTES at a time, each under the lock the ring's reader
# needs to queue a chunk: it waits ~1 ms, not the whole of it.
TRIM_AFTER_BYTES = 16 << 20
TRIM_IDLE_S = 1.0
TRIM_STEP_BYTES = 8 << 20


def _return_freed_memory() -> None:
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


@dataclass
class _Entry:
    seq: int
    events: int
    head: dict | None = None      # in the heap: {"kind", "seq", ...} and
    blob: bytes | None = None     # the records (events chunks), or
    slot: Slot | None = None      # in the queue file (on tmpfs), or
    path: Path | None = None      # spooled to disk
    size: int = 0
    ring_end: int | None = None   # events: the ring position after its records

    @property
    def memory(self) -> bool:
        """Counts against memory_bytes (heap or queue file), not the spool's."""
        return self.path is None

    def load(self, qfile: QueueFile | None) -> tuple[dict, bytes | memoryview | None]:
        if self.slot is not None:  # views of the queue file's mapping: sent from where they are
            head, records = qfile.read(self.slot)
            return msgpack.unpackb(head, raw=False), records
        if self.path is None:
            return self.head, self.blob
        data = memoryview(self.path.read_bytes())
        (n,) = _SPOOL_HEAD.unpack_from(data)
        head = msgpack.unpackb(data[4:4 + n], raw=False)
        head.pop(LOCAL, None)
        return head, (data[4 + n:] if data.nbytes > 4 + n else None)


def leftover_queues(queue_dir: Path | None, known: set[str]) -> list[tuple[str, int]]:
    """Memory queue files under queue_dir (TRACE/HOST/RUN/queue) that no spooled stream accounts
    for (its spool folder removed by hand, or another agent's spool), each with the bytes of
    memory it holds (its tmpfs pages): named at the agent's start, never removed by it. None
    (no queue folder): none."""
    out: list[tuple[str, int]] = []
    if queue_dir is None:
        return out
    known = {os.path.realpath(k) for k in known}  # a relative --queue-dir names the same folders
    try:
        paths = sorted(queue_dir.glob(f"*/*/*/{QUEUE_FILE}"))
    except OSError:
        return out
    for path in paths:
        if os.path.realpath(path.parent) in known:
            continue
        try:
            out.append((str(path), path.stat().st_blocks * 512))
        except OSError:  # gone meanwhile
            continue
    return out


def _remove_queue_folders(run_dir: Path) -> None:
    """A queue's RUN folder and its HOST and TRACE folders above it, each where empty (tmpfs is
    memory); a folder someone put other files in stays, and the ones above it."""
    for folder in (run_dir, run_dir.parent, run_dir.parent.parent):
        try:
            folder.rmdir()
        except OSError:
            break


def _file_head(path: Path) -> dict:
    """The head of a chunk's file, with its local part, without reading the records."""
    with open(path, "rb") as f:
        (n,) = _SPOOL_HEAD.unpack(f.read(4))
        head = msgpack.unpackb(f.read(n), raw=False)
    if not isinstance(head, dict):
        raise ValueError(f"{path}: not a chunk")
    return head


@dataclass
class ShipperStats:
    queued: int = 0          # chunks waiting for an ack
    sent: int = 0            # chunks written to the collector (resends included)
    acked: int = 0           # highest sequence number the collector has
    spooled: int = 0         # chunks that went to disk
    dropped_chunks: int = 0  # spool full: gone, and counted
    dropped_events: int = 0
    spool_full: str = ""     # the last chunk could not be spooled: why ("" once one could)
    reconnects: int = 0
    connected: bool = False
    last_error: str = ""
    collector_full: str = ""  # the collector could not write (disk full): why; "" once it writes again
    full_refusals: int = 0    # times it said so
    path: str = ""           # where the collector writes this stream


def _remove_left_filters(run_dir: Path, filters) -> None:
    """The clsact filters of a dead agent's trace (kernels without tcx links) run on after it:
    removed at the next agent start, so a kill leaves nothing attached beyond that window."""
    from vnet.binding import remove_left_tc_filter

    for f in filters if isinstance(filters, list) else ():
        try:
            where = f"ifindex {int(f['ifindex'])}" + (f" in netns {f['netns']}" if f.get("netns") else "")
            if remove_left_tc_filter(int(f["ifindex"]), int(f["point"]), int(f["prog_id"]), f.get("netns"),
                                     bool(f.get("qdisc"))):
                log.warning("%s: removed the clsact filter the killed agent left on %s", run_dir, where)
        except Exception as e:  # noqa: BLE001 - a device or netns gone, a damaged record: said, not fatal
            log.warning("%s: cannot remove a clsact filter the killed agent left (%s): %s", run_dir, f, e)


class Shipper:
    def __init__(self, address: str, key: bytes, opening: dict, *, spool_dir: str | os.PathLike,
                 memory_bytes: int = 64 << 20, spool_bytes: int = 1 << 30, recovering: bool = False,
                 pinned: dict | None = None, clsact: list | None = None, queue_dir: str | os.PathLike | None = None):
        self.address = address
        self.key = key
        self.opening = opening       # the "open" message's fields: trace, host, header
        self.spool_dir = Path(spool_dir)
        self.queue_dir = Path(queue_dir) if queue_dir is not None else None
        self._qfile: QueueFile | None = None  # the memory queue, when it is a file (else the heap)
        if self.queue_dir is not None and not recovering and memory_bytes > 0:
            try:
                self.queue_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._qfile = QueueFile.create(self.queue_dir / QUEUE_FILE, memory_bytes)
            except OSError as e:
                log.warning("cannot use %s for the memory queue (%s): chunks queue in this process's memory, "
                            "and what it holds dies with it if it is killed (counted)", self.queue_dir, e)
                _remove_queue_folders(self.queue_dir)  # the folders made for it
                self.queue_dir = None
        self.memory_bytes = memory_bytes
        self.spool_bytes = spool_bytes
        self.stats = ShipperStats()
        self._queue: collections.deque[_Entry] = collections.deque()
        self._next_seq = 0
        self._in_memory = 0
        self._high = 0                  # most bytes queued in memory since the last trim
        self._trim_at: float | None = None  # when the queue (empty) gives a backlog's memory back
        self._sending: int | None = None  # the queue file position of the chunk being sent: kept
        self._on_disk = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._rewind: int | None = None   # the collector said "full": send again after this seq
        self._resume_at = 0.0
        self._full_wait = FULL_RETRY_S
        self._dropping: tuple[int, int] | None = None  # dropping since the queue was last empty: the
        # (chunks, events) dropped before: the episode is logged once at its start and once at its end
        self.interrupted: str | None = None  # recovering a dead agent's stream: why (told to the collector)
        self.pinned = pinned                 # the trace's kernel counters on bpffs (vnet/agent/counters.py)
        self.clsact = clsact or []           # its clsact filters: they outlive a killed agent (recover() removes them)
        self.kernel_at_death: dict | None = None  # recovering: what they said, or
        self.kernel_unknown = ""                  # why that is not known
        # recovering: the dead agent's pinned rings, and per ring where its last queued chunk
        # ended (read out once connected)
        self.ring_left: tuple[list[str], dict[int, int]] | None = None
        self.from_ring = 0                       # recovering: events read out of those rings
        self.recovering = recovering
        if not recovering:
            try:
                self._write_opening()
            except OSError as e:  # shipping works without it; only a restart could not resume
                log.warning("cannot write %s: %s (a restarted agent could not resend this stream)",
                            self.spool_dir / OPEN_FILE, e)
        self._thread = threading.Thread(target=self._run, name="shipper", daemon=True)
        if not recovering:
            self._thread.start()

    def _write_opening(self) -> None:
        """The stream's opening on disk before anything is shipped: if this agent dies, the
        next one knows where the stream went and can say it was interrupted (recover())."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.spool_dir / f"{OPEN_FILE}.tmp"
        saved = {"address": self.address, "opening": self.opening}
        if self.pinned:
            saved["pinned"] = self.pinned
        if self.clsact:
            saved["clsact"] = self.clsact
        if self.queue_dir is not None:
            saved["queue_dir"] = str(self.queue_dir)
        tmp.write_bytes(msgpack.packb(saved, use_bin_type=True))
        os.replace(tmp, self.spool_dir / OPEN_FILE)

    @classmethod
    def recover(cls, run_dir: str | os.PathLike, key: bytes, spool_bytes: int = 1 << 30) -> "Shipper":
        """A dead agent's stream from its spool folder: the spooled chunks, sent again from
        where the collector's files end, then "interrupted" (the collector records it).
        Raises OSError or ValueError when the folder is not a readable stream."""
        run_dir = Path(run_dir)
        saved = msgpack.unpackb((run_dir / OPEN_FILE).read_bytes(), raw=False)
        if not isinstance(saved, dict) or not isinstance(saved.get("address"), str) \
                or not isinstance(saved.get("opening"), dict):
            raise ValueError(f"{run_dir / OPEN_FILE}: not a stream opening")
        queue_dir = saved.get("queue_dir")
        self = cls(saved["address"], key, saved["opening"], spool_dir=run_dir, memory_bytes=0,
                   spool_bytes=spool_bytes, recovering=True,
                   queue_dir=queue_dir if isinstance(queue_dir, str) else None)
        found: dict[int, _Entry] = {}
        ring_ends: dict[int, int] = {}  # per ring: where the last chunk taken out of it ended

        def taken(mark: int) -> None:
            ring, position = ring_unmark(mark)
            ring_ends[ring] = max(ring_ends.get(ring, 0), position)

        for path in sorted(run_dir.glob("chunk-*")):
            if path.suffix == ".tmp":  # half-written when that agent died: never resent (still in the ring)
                path.unlink(missing_ok=True)
                continue
            try:
                seq = int(path.name.removeprefix("chunk-"))
                local = _file_head(path).get(LOCAL) or {}
            except (ValueError, OSError, msgpack.UnpackException) as e:
                log.error("%s: not a chunk (%s): left where it is", path, e)
                continue
            if isinstance(local.get("ring_end"), int):
                taken(local["ring_end"])
            found[seq] = _Entry(seq, 0, path=path, size=path.stat().st_size)
        qpath = self.queue_dir / QUEUE_FILE if self.queue_dir is not None else None
        if qpath is not None and qpath.exists():
            try:
                self._qfile = QueueFile.open(qpath)
                slots = self._qfile.entries()
            except (OSError, ValueError) as e:
                log.error("%s: the dead agent's memory queue cannot be read (%s): what it held is missing",
                          qpath, e)
                slots = []
            for slot in slots:
                if slot.ring_end is not None:
                    taken(slot.ring_end)
                if slot.seq not in found:  # else killed while spooling it (stopping undelivered): spooled whole
                    found[slot.seq] = _Entry(slot.seq, 0, slot=slot, size=slot.end - slot.pos,
                                             ring_end=slot.ring_end)
        for _, e in sorted(found.items()):
            self._queue.append(e)
            if e.memory:
                self._in_memory += e.size
            else:
                self._on_disk += e.size
            self._next_seq = max(self._next_seq, e.seq + 1)
        self.stats.queued = len(self._queue)
        self.stats.spooled = len(self._queue)
        last = self._queue[-1].load(self._qfile)[0] if self._queue else {}
        self.pinned = saved.get("pinned") if isinstance(saved.get("pinned"), dict) else None
        self.clsact = saved.get("clsact") if isinstance(saved.get("clsact"), list) else []
        if last.get("kind") != "end":  # an agent that stopped but could not deliver kept its end chunk
            self.interrupted = "the agent ended without stopping this trace (killed or crashed)"
            _remove_left_filters(run_dir, saved.get("clsact"))  # before the counters: they stop counting here
            # its programs detached as it died (their links closed): the counters stopped there
            self.kernel_at_death, self.kernel_unknown = counters.read(self.pinned)
            if self.kernel_at_death is not None:
                log.warning("%s: the kernel counted %d events emitted, %d lost to a full ring when the agent died",
                            run_dir, self.kernel_at_death["emitted"], self.kernel_at_death["lost"])
            rings = counters.ring_pins(self.pinned)
            if rings:
                self.ring_left = (rings, ring_ends)  # read out once the collector says where to number from
            else:
                self.interrupted += ": its ring was not pinned, so what it had not read is missing (counted)"
        else:
            counters.unpin(self.pinned)  # a stopped trace: its end chunk has the counters
        self._thread.start()
        return self

    def _read_left_ring(self, have: int) -> None:
        """Recovering: the records the dead agent left in its rings (pinned), each from where
        its last queued chunk of that ring ended, as new chunks numbered after everything the
        collector or the files have; then the rings' pins go. On a failure to read the pins
        stay (said), so the next start tries again from the chunks' ring positions."""
        paths, ring_ends = self.ring_left
        with self._cond:
            self._next_seq = max(self._next_seq, have + 1)
        skipped = 0
        for index, path in enumerate(paths):
            try:
                skipped += self._read_one_left_ring(index, path, ring_ends.get(index, 0))
            except _RingUnreadable as e:
                log.error("%s: cannot read the dead agent's ring %s (%s): kept pinned for the next start",
                          self.spool_dir, path, e)
                return
        log.warning("%s: read %d events the dead agent had left in its ring%s%s", self.spool_dir, self.from_ring,
                    "s" if len(paths) > 1 else "", f" ({skipped} bytes it had queued already)" if skipped else "")
        counters.unpin(self.pinned, counters.RING_FIELDS)
        self.ring_left = None
        # the opening no longer names the rings: a start after this one (killed before the
        # collector recorded the interruption) finds what they held in the spool, not missing
        self.pinned = {k: v for k, v in self.pinned.items() if k not in counters.RING_FIELDS}
        try:
            self._write_opening()
        except OSError as e:
            log.warning("cannot rewrite %s: %s", self.spool_dir / OPEN_FILE, e)

    def _read_one_left_ring(self, index: int, path: str, ring_end: int) -> int:
        """One of those rings into chunks from `ring_end` on; the bytes skipped (chunks queued
        already). A ring that cannot be opened is said to be missing; one that cannot be read
        raises _RingUnreadable."""
        from vnet.binding import PinnedMap
        from vnet.binding.ringbatch import RingBatchReader

        try:
            ring = PinnedMap(path)
        except Exception as e:  # noqa: BLE001 - removed by hand: what was in it is unknown
            log.error("%s: the dead agent's ring %s cannot be opened (%s): what it had not read is missing",
                      self.spool_dir, path, e)
            self.interrupted += f": what it had not read is missing (its ring {path} could not be opened)"
            return 0
        try:
            reader = RingBatchReader(ring)
            try:
                skipped = reader.skip_to(ring_end)  # queued in a file, not yet taken out of the ring
                while True:
                    batch = reader.peek(max_records=RING_BATCH_MAX)
                    if batch.count:
                        self.put("events", batch.data, count=batch.count,
                                 ring_end=ring_mark(index, reader.position + batch.nbytes))
                        self.from_ring += batch.count
                    reader.consume(batch)
                    if not batch.nbytes:
                        return skipped
            finally:
                reader.close()
        except Exception as e:  # noqa: BLE001 - the chunks read so far carry their ring positions
            raise _RingUnreadable(str(e)) from None
        finally:
            ring.close()

    @property
    def done(self) -> bool:
        """Everything delivered (and, recovering, the interruption recorded)."""
        with self._cond:
            return not self._queue and self.interrupted is None

    # -- producer side ------------------------------------------------------------------------------
    def put(self, kind: str, records=None, *, keep: bool = False, ring_end: int | None = None, **fields) -> int:
        """Queue a chunk; returns its sequence number. `records` (an events chunk's ring
        batch, any buffer) is copied once, here (into the queue file, or the heap),
        and shipped raw beside the chunk's head: the collector writes it to the trace file
        as the chunk's last field, "records". An events chunk's "count" is what it costs if
        it is lost; `ring_end`, the ring position after its records (a successor reading the
        dead agent's ring starts there). `keep`: held in memory past its bound rather than
        dropped (a trace's last chunks: a few KiB, and without them the collector's file
        would not say how the trace ended or what it lost). On return the chunk is in the
        queue: the caller may give its records' ring space back."""
        events = int(fields.get("count", 0)) if kind == "events" else 0
        with self._cond:
            seq = self._next_seq
            self._next_seq += 1
            head = {"kind": kind, "seq": seq, **fields}
            packed = msgpack.packb(head, use_bin_type=True)
            size = len(packed) + (memoryview(records).nbytes if records is not None else 0)
            entry = _Entry(seq, events, size=size, ring_end=ring_end)
            if (self._in_memory + size <= self.memory_bytes or keep and records is None and size <= 1 << 20) \
                    and self._hold(entry, head, packed, records, keep=keep):
                pass
            elif (why := self._spool(entry, head, records)) is None:
                self._on_disk += size
                self.stats.spooled += 1
                self.stats.spool_full = ""
            else:
                self._dropped(seq, events, why)
                # The collector must not wait for it: a marker says what is gone.
                entry = _Entry(seq, 0, size=64)
                marker = {"kind": "dropped", "seq": seq, "events": events}
                self._hold(entry, marker, msgpack.packb(marker, use_bin_type=True), None, force=True)
            self._queue.append(entry)
            self.stats.queued = len(self._queue)
            self._cond.notify_all()
        return seq

    def flush(self, timeout: float) -> bool:
        """Wait until the collector has every chunk queued so far (True) or `timeout` passes,
        or the collector has said for FULL_FLUSH_S that it cannot write (its disk is full:
        the chunks are kept, see keep())."""
        deadline = time.monotonic() + timeout
        with self._cond:
            last = self._next_seq - 1
            progress, acked = time.monotonic(), self.stats.acked
            while self.stats.acked < last and time.monotonic() < deadline:
                if self.stats.acked != acked:
                    progress, acked = time.monotonic(), self.stats.acked
                elif self.stats.collector_full and time.monotonic() - progress > FULL_FLUSH_S:
                    break
                self._cond.wait(0.1)
            return self.stats.acked >= last

    def keep(self) -> None:
        """The trace stopped before the collector had everything: what is queued in memory
        goes to the spool (an agent killed now loses nothing of it), and shipping goes on in
        the background until the collector has it all; then the spool folder goes."""
        with self._cond:
            self._spill_queued()
            self.recovering = True  # the thread ends once everything is acknowledged

    def close(self) -> None:
        """Stop shipping. Delivered: the spool folder goes. Not: what is queued in memory
        is written to the spool, so that the next agent start sends it (recover())."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=5)
        with self._cond:
            if not self._queue and self.interrupted is None:
                self._remove_spool()
                return
            self._spill_queued()

    def _spill_queued(self) -> None:
        """What is queued in memory goes to the spool (under self._cond), up to the first failure:
        a stream that outlives its trace may wait long; the disk keeps it across a reboot too,
        and tmpfs is memory."""
        for e in self._queue:
            if e.memory:
                try:
                    self._spill(e)
                except OSError as err:
                    log.error("cannot keep chunk %d in %s: %s", e.seq, self.spool_dir, err)
                    return
        if self._sending is None:
            self._drop_queue_file()  # every chunk it held is in the spool

    def _hold(self, e: _Entry, head: dict, packed: bytes, records, force: bool = False, keep: bool = False) -> bool:
        """The chunk into the memory queue (under self._cond): the queue file, or a heap copy
        without one (or, `force`/`keep`, when the file has no room). False: the file has no room
        (its bound, or its tmpfs full): the spool is tried next."""
        if self._qfile is not None:
            try:
                e.slot = self._qfile.append(e.seq, packed, records, e.ring_end, self._sending)
            except (OSError, ValueError, BufferError) as err:  # a full tmpfs is a None (queuefile reserves)
                log.warning("cannot queue chunk %d in %s (%s)", e.seq, self._qfile.path, err)
            if e.slot is None and not (force or keep):
                return False
        if e.slot is None:
            e.head, e.blob = head, bytes(records) if records is not None else None
        self._in_memory += e.size
        self._high = max(self._high, self._in_memory)
        return True

    def _spool(self, e: _Entry, head: dict, records) -> str | None:
        """The chunk to the spool (under self._cond): None, or why it could not go there. Its
        disk full (ENOSPC before the --spool-mb bound) or failing counts as the spool full."""
        if self._on_disk + e.size > self.spool_bytes:
            return f"its bound of {self.spool_bytes >> 20} MiB (--spool-mb) reached"
        try:
            self._write(e, head, records, self.spool_dir)
            return None
        except OSError as err:
            return f"cannot write {self.spool_dir}: {err.strerror or err}"

    def _dropped(self, seq: int, events: int, why: str) -> None:
        """A chunk the spool could not take: counted; said once per episode (until the queue
        has drained), not per chunk: a full disk refuses every chunk for as long as it lasts."""
        self.stats.dropped_chunks += 1
        self.stats.dropped_events += events
        self.stats.spool_full = why
        if self._dropping is None:
            self._dropping = (self.stats.dropped_chunks - 1, self.stats.dropped_events - events)
            log.error("spool full (%s): from chunk %d on, what neither the memory queue nor the spool can hold "
                      "is dropped and its events counted lost (agent_spool_full)", why, seq)

    def _spill(self, e: _Entry) -> None:
        """A memory queue's chunk to the spool (stopping with chunks undelivered). From the queue
        file it stays there too until it is acknowledged (a kill now leaves both copies:
        recover() sends the spool's)."""
        head, records = e.load(self._qfile)
        self._write(e, head, records, self.spool_dir)
        e.head = e.blob = None
        e.slot = None  # its space in the queue file is freed with the next one acknowledged from there
        self._in_memory -= e.size
        self._on_disk += e.size

    def _write(self, e: _Entry, head: dict, records, folder: Path) -> None:
        """The chunk's file in `folder`, whole or absent (a restarted agent resends what it finds)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"chunk-{e.seq:012d}"
        tmp = path.with_name(path.name + ".tmp")
        if e.ring_end is not None:
            head = {**head, LOCAL: {"ring_end": e.ring_end}}
        packed = msgpack.packb(head, use_bin_type=True)
        try:
            with open(tmp, "wb") as f:  # buffered: a short write is retried, and its error raised
                f.write(_SPOOL_HEAD.pack(len(packed)) + packed)
                if records is not None:
                    f.write(records)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        e.path = path

    def _drop_queue_file(self) -> None:
        """The queue file goes (nothing in it is needed: delivered or spooled)."""
        if self._qfile is not None:
            self._qfile.close(drop=True)
            self._qfile.path.unlink(missing_ok=True)
            self._qfile = None

    def _remove_spool(self) -> None:
        # a .tmp is a write that failed half-way (disk full) or an agent killed during one: never a chunk
        for p in [self.spool_dir / OPEN_FILE, self.spool_dir / f"{OPEN_FILE}.tmp", *self.spool_dir.glob("*.tmp")]:
            p.unlink(missing_ok=True)
        self._drop_queue_file()
        # empty by now; a folder someone put other files in stays. A write that races this makes
        # it again (_write)
        with contextlib.suppress(OSError):
            self.spool_dir.rmdir()
        if self.queue_dir is not None:
            _remove_queue_folders(self.queue_dir)

    @property
    def queued_events(self) -> int:
        """Events in chunks not yet acknowledged (known for chunks this agent queued)."""
        with self._cond:
            return sum(e.events for e in self._queue)

    # -- the connection -----------------------------------------------------------------------------
    def _ack(self, seq: int) -> None:
        with self._cond:
            if seq > self.stats.acked and self.stats.collector_full:
                log.warning("collector %s writes again (after chunk %d)", self.address, seq)
                self.stats.collector_full = ""
                self._full_wait = FULL_RETRY_S
            self.stats.acked = max(self.stats.acked, seq)
            while self._queue and self._queue[0].seq <= seq:
                e = self._queue.popleft()
                if e.path is not None:
                    e.path.unlink(missing_ok=True)
                if e.slot is not None:
                    self._qfile.release(e.slot)
                if e.memory:
                    self._in_memory -= e.size
                else:
                    self._on_disk -= e.size
            self.stats.queued = len(self._queue)
            self._cond.notify_all()
            if not self._queue and self._dropping is not None:
                chunks, events = self._dropping
                log.warning("collector %s has everything queued again; %d chunks (%d events) were dropped while "
                            "the spool was full", self.address, self.stats.dropped_chunks - chunks,
                            self.stats.dropped_events - events)
                self._dropping = None
            if not self._queue and self._high >= TRIM_AFTER_BYTES and self._trim_at is None:
                self._trim_at = time.monotonic() + TRIM_IDLE_S  # the shipper's thread, when idle

    def _trim_step(self) -> str | None:
        """The shipper's thread, idle (under self._cond): a backlog's memory back once the queue
        has been empty for TRIM_IDLE_S, a step at a time. "file": a step of the queue file's
        pages was given, more may follow; "heap": those are done, the heap's go next (the
        caller, without the lock); None: nothing to do now."""
        if self._trim_at is None or time.monotonic() < self._trim_at:
            return None
        if self._queue or self._sending is not None:
            self._trim_at = time.monotonic() + TRIM_IDLE_S  # busy again: later
            return None
        if self._qfile is not None and self._qfile.trim(most=TRIM_STEP_BYTES):
            return "file"  # from the top of the area; the working bytes' pages stay
        self._trim_at, self._high = None, 0
        return "heap"

    def _full(self, msg) -> None:
        """The collector could not write the chunk after `have`: rewind to it and wait."""
        have = msg.get("have")
        with self._cond:
            if not isinstance(have, int):
                return
            why = str(msg.get("message") or "the collector cannot write")
            if not self.stats.collector_full:
                log.error("collector %s cannot write after chunk %d (%s): chunks stay queued here and are "
                          "sent again", self.address, have, why)
            self.stats.collector_full = why
            self.stats.full_refusals += 1
            self._rewind = have if self._rewind is None else min(self._rewind, have)
            self._resume_at = time.monotonic() + self._full_wait
            self._full_wait = min(FULL_RETRY_MAX_S, self._full_wait * 2)
            self._cond.notify_all()

    def _run(self) -> None:
        self.stats.acked = -1
        wait = RECONNECT_S
        while not self._stop.is_set():
            opened = False
            try:
                opened = self._session()
            except (OSError, ConnectionError, VnetError) as e:  # unreachable, refused, cut, broke the protocol
                if str(e) != self.stats.last_error:
                    log.warning("collector %s: %s (retrying; chunks queue meanwhile)", self.address, e)
                self.stats.last_error = str(e)
            except Exception:  # noqa: BLE001
                log.exception("shipper failed; retrying")
            self.stats.connected = False
            if self.recovering and self.done:
                with self._cond:
                    self._remove_spool()
                return
            wait = RECONNECT_S if opened else min(RECONNECT_MAX_S, wait * 2)
            if self._stop.wait(wait):
                return

    def _session(self) -> bool:
        """One connection; whether it got as far as "opened" (the reconnect back-off restarts)."""
        ch = connect(self.address, self.key, "collector", limit=MAX_DATA_BYTES, timeout=SESSION_TIMEOUT_S)
        try:
            reply = ch.request({"type": "open", **self.opening}, ("opened",))
            have = int(reply.get("have", -1))  # the last sequence the collector wrote before
            self.stats.path = str(reply.get("path", ""))
            self._ack(have)
            if self.ring_left is not None:
                self._read_left_ring(have)
            self.stats.connected = True
            self.stats.reconnects += 1
            with self._cond:
                self._rewind = None
            reader = threading.Thread(target=self._read_acks, args=(ch,), name="shipper-acks", daemon=True)
            reader.start()
            sent_upto = have
            while not self._stop.is_set() and reader.is_alive():
                with self._cond:
                    if self._rewind is not None:
                        if time.monotonic() < self._resume_at:
                            self._cond.wait(min(0.2, self._resume_at - time.monotonic()))
                            continue
                        sent_upto, self._rewind = min(sent_upto, self._rewind), None
                    pending = [e for e in self._queue if e.seq > sent_upto]
                    if not pending:
                        if self.recovering and self.stats.acked >= self._next_seq - 1:
                            if self.interrupted is not None:
                                self._tell_interrupted(ch)
                            return True
                        trim = self._trim_step()
                        if trim is None:
                            self._cond.wait(0.2)
                if not pending:
                    if trim == "heap":
                        _return_freed_memory()  # glibc's free chunks (a queue without a file: its copies)
                    continue
                for e in pending:
                    if self._rewind is not None:
                        break  # the collector stopped writing: the rest waits
                    with self._cond:
                        if e.seq <= self.stats.acked:
                            continue  # acknowledged meanwhile (a resend)
                        # sent from the queue file's mapping: its space is not written again, nor
                        # the file dropped, meanwhile (a spill only adds a spool copy)
                        slot, qfile = e.slot, self._qfile
                        self._sending = slot.pos if slot is not None else None
                    try:
                        head, blob = e.load(qfile)
                        ch.send({"type": "chunk", "seq": e.seq, "chunk": head}, blob=blob)
                    finally:
                        if slot is not None:
                            with self._cond:
                                self._sending = None
                    self.stats.sent += 1
                    sent_upto = e.seq
            return True
        finally:
            ch.close()

    def _tell_interrupted(self, ch) -> None:
        """Recovering: every spooled chunk is written; the collector records the interruption,
        with the kernel's counters at the agent's death (or why they are unknown)."""
        msg = {"type": "interrupted", "reason": self.interrupted}
        if self.kernel_at_death is not None:
            msg["kernel"] = self.kernel_at_death
        else:
            msg["kernel_unknown"] = self.kernel_unknown
        ch.send(msg)
        ch_reply_deadline = time.monotonic() + SESSION_TIMEOUT_S
        while time.monotonic() < ch_reply_deadline:
            with self._cond:
                if self.interrupted is None:
                    break
                self._cond.wait(0.1)

    def _read_acks(self, ch) -> None:
        try:
            while True:
                msg = ch.recv(("ack", "ping", "full", "recorded"))
                if msg["type"] == "ack":
                    self._ack(int(msg["seq"]))
                elif msg["type"] == "full":
                    self._full(msg)
                elif msg["type"] == "recorded":  # the interruption is in the collector's file
                    counters.unpin(self.pinned)  # its counters too: the pin has done its work
                    with self._cond:
                        self.interrupted = None
                        self._cond.notify_all()
                else:  # the collector measures our clock: answer at once
                    ch.send({"type": "pong", "t": msg.get("t"), "mono_ns": time.monotonic_ns(),
                             "real_ns": time.time_ns()})
        except Exception as e:  # noqa: BLE001 - the session loop reconnects
            log.info("collector connection ended: %s", e)
