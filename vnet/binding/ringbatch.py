"""Read a BPF ring buffer map in batches: one bytes copy per batch, no Python call per record.

libbpf's ring_buffer__poll calls back into Python once per record (RingBuffer),
most of a microsecond each (tools/bench/ring_drain.py). This reader maps the ring itself, as the kernel lays
it out (kernel/bpf/ringbuf.c), and copies every committed record in one go:

    offset 0          consumer position page, read-write: we store how far we read
    offset page       producer position page, read-only
    offset 2 * page   the data area (max_entries bytes, a power of two); the kernel
                      offers it twice in a row, so that a record that wraps reads
                      contiguously, but this reader maps it once: every mapped page
                      counts in the process's VmRSS (an 8 MiB ring was 16 MiB of it)

Positions are free-running u64 byte counters; a record starts at pos & (size - 1)
with an 8-byte header: u32 length with BUSY (not committed yet) and DISCARD
bits, u32 the kernel's page offset; the whole record is padded to 8 bytes.

Batch.data is the ring's bytes as they are, from our position to the first
record still being written (a copy of the ring, so no repacking per record;
peek() gives the ring itself, for writing a batch out without any copy, and
stops at the end of the data area: the record the end cuts comes alone, as a
copy of its two pieces, and the next batch starts at the beginning):

    repeated:  u32 len_flags   bits 0-29 length; bit 30 set: discarded, skip it
               u32 reserved    (the kernel's page offset; meaningless here)
               length bytes    the record, then padding to a multiple of 8

records(data) splits it back into the records. Host byte order, as the ring.
"""

from __future__ import annotations

import errno
import mmap
import select
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator

from vnet.errors import BpfError, UsageError, bpf_error

from .object import Map

BPF_MAP_TYPE_RINGBUF = 27
BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
LEN_MASK = DISCARD_BIT - 1
HDR_SIZE = 8
_U32 = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class Batch:
    data: bytes | memoryview  # the framing above (a view of the ring itself from peek())
    count: int       # records to decode (not discarded)
    discarded: int   # records the programs discarded: in data, skipped by records()

    @property
    def nbytes(self) -> int:
        return len(self.data)


def _run(words, first: int, stride: int, n: int) -> int:
    """How many of the n u32 at first, first + stride, ... equal the first one.
    Compared as bytes in blocks that double: a stream of same-size records costs
    a few C-level copies instead of a Python step per record."""
    value = words[first:first + 1].tobytes()
    done = 1
    while done < n:
        step = min(done, n - done)
        block = words[first + done * stride:first + (done + step) * stride:stride].tobytes()
        if block == value * step:
            done += step
            continue
        lo, hi = 0, step  # block[:lo] matches, block[:hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if block[:mid * 4] == value * mid:
                lo = mid
            else:
                hi = mid
        return done + lo
    return done


def walk(words, start: int, limit: int, max_records: int | None = None) -> tuple[int, int, int]:
    """Walk record headers in `words` (a u32 view of a ring) from byte offset
    `start` (8-aligned) over at most `limit` bytes: (bytes of committed records,
    records, discarded records). Stops at the first record still being written,
    and after max_records records (discarded ones included); at least one record
    goes if there is one.

    A run of records with the same header word is taken at once: each header of
    the run was checked, and a record of another size, a discarded or a busy one
    ends the run at its own header (all before it had the run's size)."""
    pos = count = discarded = 0
    left = max_records if max_records is not None else limit
    while pos < limit and left > 0:
        idx = (start + pos) >> 2
        len_flags = words[idx]
        if len_flags & BUSY_BIT:
            break
        size = ((len_flags & LEN_MASK) + HDR_SIZE + 7) & ~7
        if pos + size > limit:
            if pos:
                break  # max_bytes reached
            n = 1  # a lone oversized record still goes
        else:
            n = _run(words, idx, size >> 2, min((limit - pos) // size, left))
        pos += n * size
        left -= n
        if len_flags & DISCARD_BIT:
            discarded += n
        else:
            count += n
    return pos, count, discarded


def records(data: bytes | bytearray | memoryview) -> Iterator[memoryview]:
    """The records of a Batch.data blob (discarded ones skipped), as views into it.
    The blob may come from a file or the network: a bad frame raises ValueError."""
    view = memoryview(data).cast("B")
    end = len(view)
    words = view[:end - end % 8].cast("I")
    pos = 0
    while pos < end:
        if end - pos < HDR_SIZE:
            raise ValueError(f"ring batch: {end - pos} stray bytes at offset {pos}")
        len_flags = words[pos >> 2]
        size = ((len_flags & LEN_MASK) + HDR_SIZE + 7) & ~7
        if len_flags & BUSY_BIT or pos + size > end:
            raise ValueError(f"ring batch: bad record header {len_flags:#x} at offset {pos}")
        n = _run(words, pos >> 2, size >> 2, (end - pos) // size)  # same-size records: no header parse each
        if not len_flags & DISCARD_BIT:
            length = len_flags & LEN_MASK
            for p in range(pos + HDR_SIZE, pos + HDR_SIZE + n * size, size):
                yield view[p:p + length]
        pos += n * size


def pack_records(items: Iterable[bytes], discarded: Iterable[int] = ()) -> bytes:
    """Records in the Batch.data framing (the ring's), e.g. for tests and tools;
    the records at the indexes in `discarded` are marked as such."""
    skip = set(discarded)
    out = bytearray()
    for i, rec in enumerate(items):
        if len(rec) > LEN_MASK:
            raise ValueError(f"record of {len(rec)} bytes is too long for the ring framing")
        out += _U32.pack(len(rec) | (DISCARD_BIT if i in skip else 0)) + bytes(4) + rec
        out += bytes(-len(out) % 8)
    return bytes(out)


class _Mapping:
    """The two mappings and the epoll instance; owned by the map's BpfObject so
    closing the object unmaps them (only this, not the reader: see ringbuf._Reader)."""

    def __init__(self, fd: int, size: int):
        page = mmap.PAGESIZE
        self.page = page
        self.consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self.ring = mmap.mmap(fd, page + size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)  # data once
        except BaseException:
            self.consumer.close()
            raise
        self.cons_pos = memoryview(self.consumer).cast("Q")
        self.bytes = memoryview(self.ring)
        self.words = self.bytes.cast("I")   # record headers, indexed by byte offset // 4
        self.prod_pos = self.bytes.cast("Q")  # [0]: the producer position
        self.epoll = select.epoll()
        self.epoll.register(fd, select.EPOLLIN)
        # Edge-triggered: reports the kernel waking the ring's readers, not data being
        # there, so a reader can wait while records gather and still hear a forced wakeup.
        self.edge = select.epoll()
        self.edge.register(fd, select.EPOLLIN | select.EPOLLET)
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for view in (self.cons_pos, self.prod_pos, self.words, self.bytes):
            view.release()
        self.epoll.close()
        self.edge.close()
        for m in (self.consumer, self.ring):
            try:
                m.close()
            except BufferError:  # a view is still out (another thread mid-read): unmapped when it goes
                pass


class _Pacing:
    """Waiting for records to gather, for a reader of one ring or of several: it needs
    pending(), closed, and _edge_poll(timeout_s), a wait for the kernel's next wakeup."""

    def gather(self, want: int, timeout_ms: float) -> int:
        """Let records gather: return once `want` bytes are pending or after timeout_ms.
        Unlike a sleep it hears the kernel's wakeups meanwhile, so with `want` at most the
        programs' mark (they force a wakeup as the unread data crosses it, vnet_wakeup_flags)
        a burst is drained as soon as it is there, long before the ring fills; unlike wait()
        it does not return just because some data is there. Returns the bytes pending."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            pending = self.pending()
            left = deadline - time.monotonic()
            if pending >= want or left <= 0:
                return pending
            # Edge-triggered: one report per wakeup. One that came before this call (during
            # the caller's last write) returns at once, and then the next poll waits.
            self._edge_poll(left)
            if self.closed:
                return 0

    def hold(self, want: int, since_s: float, delay_ms: float, step_ms: float) -> bool:
        """Pacing for a reader that keeps up with a steady flow, which would otherwise read
        (and write out) a small batch each time round. With less than `want` bytes pending,
        less than delay_ms after its last batch (since_s ago): gather() until, at the rate
        they came at since then, `want` are there, at most step_ms. True if it waited (ask
        again), False: read now. A first record after a quiet spell is read at once, and a
        flow that brings `want` within a millisecond is read without waiting."""
        pending = self.pending()
        if pending >= want or since_s * 1000 >= delay_ms:
            return False
        until_want = (want - pending) * since_s * 1000 / pending if pending else step_ms
        if until_want < 1.0:
            return False  # a fast flow: its batches are large anyway (epoll waits whole ms)
        self.gather(want, min(step_ms, delay_ms - since_s * 1000, until_want))
        return True


class RingBatchReader(_Pacing):
    """Batches from one ring-buffer map. Not for use by two threads at once,
    nor together with a RingBuffer on the same map (both move the consumer position).

    Programs may skip waking the reader (BPF_RB_NO_WAKEUP): call read() after
    every wait(), whatever it returned.
    """

    def __init__(self, ring_map: Map):
        if ring_map.type != BPF_MAP_TYPE_RINGBUF:
            raise UsageError(f"map {ring_map.name} is not a ring buffer (type {ring_map.type})")
        size = ring_map.max_entries
        if size < mmap.PAGESIZE or size & (size - 1):
            raise UsageError(f"ring buffer {ring_map.name} has size {size}: not a power-of-two number of pages")
        self.map = ring_map
        self.size = size
        self._mask = size - 1
        try:
            mapping = _Mapping(ring_map.fd, size)
        except OSError as e:
            raise bpf_error("mmap ring buffer", e.errno or errno.EINVAL, f"map {ring_map.name}") from None
        owner = getattr(ring_map, "_obj", None)  # a PinnedMap has no object: the reader owns the mapping
        self._m = owner._own(mapping) if owner is not None else mapping
        weakref.finalize(self, mapping.close)
        self._data = mapping.page  # where the data area starts in the mapping's bytes
        self._init_reading()

    def _init_reading(self) -> None:
        # Releasing and re-taking a held lock orders the memory accesses before it
        # against those after it (release, then acquire): what the ring protocol
        # needs on weakly ordered CPUs (arm64); on x86 they are in order anyway.
        self._fence_lock = threading.Lock()
        self._fence_lock.acquire()
        self._peeked: tuple[int, int] | None = None  # (consumer position, bytes) of a batch given out by peek()
        self._end_cut = False  # the last peek() stopped at the end of the data area

    def _fence(self) -> None:
        self._fence_lock.release()
        self._fence_lock.acquire()

    def _live(self) -> _Mapping:
        m = self._m
        if m.closed:
            raise BpfError("read", errno.EBADF, f"ring buffer {self.map.name} (closed with its object)")
        return m

    @property
    def closed(self) -> bool:
        return self._m.closed

    @property
    def position(self) -> int:
        """The consumer position: bytes ever consumed from this ring (by any reader)."""
        return self._consumer(self._live())

    def _consumer(self, m) -> int:
        return m.cons_pos[0]

    def _producer(self, m) -> int:
        return m.prod_pos[0]

    def _set_position(self, m, pos: int) -> None:
        m.cons_pos[0] = pos

    def pending(self) -> int:
        """Bytes between our position and the producer's (committed or not)."""
        m = self._live()
        return self._producer(m) - self._consumer(m)

    def read(self, max_bytes: int | None = None, max_records: int | None = None) -> Batch:
        """Every record committed since the last read, up to the first one still
        being written; at most max_bytes of ring (headers included) or max_records
        records, though always at least one record if there is one. A copy; what
        wraps around the ring's end is joined."""
        parts: list[bytes] = []
        count = discarded = nbytes = 0
        while True:
            batch = self.peek(None if max_bytes is None else max_bytes - nbytes,
                              None if max_records is None else max_records - count - discarded)
            if not batch.nbytes:
                break
            if parts and max_bytes is not None and nbytes + batch.nbytes > max_bytes:
                self._peeked = None  # a lone record past max_bytes goes only as the first
                break
            data = batch.data
            if isinstance(data, memoryview):
                batch = Batch(data.tobytes(), batch.count, batch.discarded)  # the records' bytes, with their headers
                data.release()
            self.consume(batch)
            parts.append(batch.data)
            count, discarded, nbytes = count + batch.count, discarded + batch.discarded, nbytes + batch.nbytes
            if (not self._end_cut  # it ended where the records do, not at the ring's end
                    or (max_bytes is not None and nbytes >= max_bytes)
                    or (max_records is not None and count + discarded >= max_records)):
                break
        if not parts:
            return Batch(b"", 0, 0)
        return Batch(parts[0] if len(parts) == 1 else b"".join(parts), count, discarded)

    def peek(self, max_bytes: int | None = None, max_records: int | None = None) -> Batch:
        """Like read(), without a copy: Batch.data is a memoryview of the ring
        itself, valid until consume(batch), which gives the space back to the
        programs (then the view must no longer be read). For writing a batch out
        (a file, a socket) straight from the ring. A batch ends at the end of the
        ring's data area (read() joins the two); the one record cut by that end
        comes as a batch of its own, a bytes copy."""
        m = self._live()
        if self._peeked is not None:
            raise UsageError(f"ring buffer {self.map.name}: peek() again before consume()")
        cons = self._consumer(m)
        prod = self._producer(m)  # once per batch: what arrives meanwhile waits for the next read
        self._fence()  # headers below prod were written before prod moved
        off = cons & self._mask
        start = self._data + off
        limit = min(prod - cons, self.size - off)  # the data area is mapped once: stop at its end
        self._end_cut = limit < prod - cons  # for read(): more may follow from the beginning
        if max_bytes is not None:
            limit = min(limit, max_bytes)
        pos, count, discarded = walk(m.words, start, limit, max_records)  # a lone record may pass limit
        if not pos:
            return Batch(b"", 0, 0)
        self._fence()  # the records' bytes are read after their committed headers
        self._peeked = (cons, pos)
        if off + pos > self.size:  # one record cut by the end (its 8-byte header never is): join it
            first = self.size - off
            data = m.bytes[start:start + first].tobytes() + m.bytes[self._data:self._data + pos - first].tobytes()
            return Batch(data, count, discarded)
        return Batch(m.bytes[start:start + pos], count, discarded)

    def consume(self, batch: Batch) -> None:
        """Move the consumer position past a peeked batch."""
        if not batch.nbytes:
            return
        m = self._live()
        if self._peeked is None or self._peeked[1] != batch.nbytes or self.position != self._peeked[0]:
            raise UsageError(f"ring buffer {self.map.name}: consume() of a batch that is not the one peeked")
        cons, pos = self._peeked
        self._peeked = None
        self._fence()  # the records' bytes were read before the producer may reuse their space
        self._set_position(m, cons + pos)

    def skip_to(self, position: int) -> int:
        """Move the consumer position forward to `position` (records already taken out, by a
        reader that died before it said so: Shipper.recover); never back, nor past the producer.
        Returns the bytes skipped."""
        m = self._live()
        if self._peeked is not None:
            raise UsageError(f"ring buffer {self.map.name}: skip_to() between peek() and consume()")
        cons, prod = self.position, self._producer(m)
        target = min(max(cons, position), prod)
        self._fence()
        self._set_position(m, target)
        return target - cons

    def wait(self, timeout_ms: int) -> bool:
        """Block until the kernel signals data or timeout_ms pass (-1: forever);
        returns at once if data is already there. True if data is pending."""
        m = self._live()
        if m.prod_pos[0] != m.cons_pos[0]:
            return True
        m.epoll.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1)
        return not m.closed and m.prod_pos[0] != m.cons_pos[0]

    def _edge_poll(self, timeout_s: float) -> None:
        self._live().edge.poll(timeout_s)

    @property
    def epoll_fd(self) -> int:
        """To wait for several readers (and other fds) in one epoll."""
        return self._live().epoll.fileno()

    records = staticmethod(records)

    def close(self) -> None:
        self._m.close()


class RingGroupReader(_Pacing):
    """The rings of one trace (one per CPU, or one for all) read together: one wait
    for any of them, their pending bytes summed for pacing; each ring's batches come
    from its own reader (`readers`, in ring order), since a batch is one ring's bytes.
    Records of different rings are not in time order with each other. `areas`: readers of
    the CPUs' event areas (cpuarea.AreaReader), read as more rings after them; they are
    waited for through the rings, where the programs ring for them."""

    def __init__(self, ring_maps, areas=()):
        ring_maps = list(ring_maps)
        if not ring_maps:
            raise UsageError("no ring buffer to read")
        self.readers: list[RingBatchReader] = []
        try:
            for m in ring_maps:
                self.readers.append(RingBatchReader(m))
            self.readers += areas
            # One epoll over every ring's descriptor, level- and edge-triggered (as _Mapping's);
            # the rings' own descriptors close with their objects, which takes them out of these.
            self._epoll = select.epoll()
            self._edge = select.epoll()
            for m in ring_maps:
                self._epoll.register(m.fd, select.EPOLLIN)
                self._edge.register(m.fd, select.EPOLLIN | select.EPOLLET)
        except OSError as e:  # out of descriptors, most likely
            self.close()
            raise bpf_error("wait for", e.errno or errno.EINVAL, "ring buffers") from None
        except BaseException:
            self.close()
            raise
        weakref.finalize(self, _close_epolls, self._epoll, self._edge)

    @property
    def closed(self) -> bool:
        return any(r.closed for r in self.readers)

    def pending(self) -> int:
        return sum(r.pending() for r in self.readers)

    def fill(self) -> float:
        """The fullest ring's unread share: where the next loss would come first."""
        return max(r.pending() / r.size for r in self.readers)

    def batches(self, max_records: int) -> Iterator[tuple[int, RingBatchReader, Batch]]:
        """One round over the rings: (ring number, its reader, a peek()ed batch) for each ring
        with committed records, at most one batch each; the caller consume()s it before the
        next. Records the programs discarded are consumed here, and past a batch of only those
        that stopped at the ring's end the round goes on from the ring's start."""
        for i, reader in enumerate(self.readers):
            while reader.pending():  # (an idle CPU's ring: no peek)
                batch = reader.peek(max_records=max_records)
                if batch.count:
                    yield i, reader, batch
                    break
                reader.consume(batch)
                if not batch.nbytes:
                    break

    def read(self) -> Batch:
        """Every record committed to any ring (as RingBatchReader.read), one ring's after
        another's: one blob, in the same framing."""
        batches = [b for b in (r.read() for r in self.readers) if b.nbytes]
        if len(batches) <= 1:
            return batches[0] if batches else Batch(b"", 0, 0)
        return Batch(b"".join(b.data for b in batches), sum(b.count for b in batches),
                     sum(b.discarded for b in batches))

    def wait(self, timeout_ms: int) -> bool:
        """As RingBatchReader.wait, for any ring."""
        if self.pending():
            return True
        self._epoll.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1)
        return not self.closed and self.pending() > 0

    def _edge_poll(self, timeout_s: float) -> None:
        self._edge.poll(timeout_s)

    def close(self) -> None:
        for r in self.readers:
            r.close()
        for ep in (getattr(self, "_epoll", None), getattr(self, "_edge", None)):
            if ep is not None:
                ep.close()


def _close_epolls(*epolls) -> None:
    for ep in epolls:
        ep.close()
