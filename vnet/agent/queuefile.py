"""The agent's memory queue as one mapped file on tmpfs: it outlives a killed agent (the
heap does not) and costs what heap copies did (a memcpy into pages that stay mapped; a
file per chunk cost the agent ~0.1-0.2 us more per event, tools/bench/drain.py).

    offset 0     header page: magic, data size, tail, head (u64 positions, free-running),
                 skip from, skip to (u64 positions; 0, 0 in files of agents before it)
    offset 4096  the data area: entries, each 8-byte aligned, never across its end

    entry        u32 magic, u32 head length, u64 seq, u64 records length, i64 ring_end
                 (-1: none), the msgpack head as shipped, the records, padding

Entries are appended at head and released in order from tail (the collector acknowledges
in order). An entry that would cross the end of the area starts the next lap (a WRAP word
where it would have begun). Appended entries are whole before head moves past them, so a
successor walking tail -> head (entries()) finds only whole ones.

A queue that keeps up stays in the area's first WORKING bytes: an entry that would end past
them starts the next lap if the beginning is free and what is queued fits in those bytes with
it (and an empty queue starts there again), so only those pages are touched (tmpfs memory,
resident in the agent once the shipper has read them) and they stay (no page allocated per
chunk). A backlog spreads over the area; trim() gives its pages back. An entry on pages the
file does not have yet is written with pwritev (fresh pages; ENOSPC, not SIGBUS, on a full
tmpfs); on pages it has, stored through the mapping, which is also what the shipper sends from.
If the collector stalls right after such a jump, the entries still queued at the end of the
lap before are in the way of the new lap's: the next entry goes on past them, where that lap
ended, and the header's skip tells the walk (release(), entries()) to go on there from where
the new lap's entries stopped. One skip at a time: the area fills whatever the moment of the
stall (61 of 64 MiB at worst in the test, ~1 MiB before), not the disk spool.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"VNETQUE1"
HEADER = 4096
_HEAD = struct.Struct("=8sQQQ")      # magic, data size, tail, head
_TAIL_AT, _HEAD_AT = 16, 24
_SKIP_AT = 32                        # u64 from, u64 to: the walk from `from` goes on at `to` (0, 0: none)
_SKIP = struct.Struct("=QQ")
ENTRY = struct.Struct("=IIQQq")     # magic, head length, seq, records length, ring_end
ENTRY_MAGIC = 0x51454E56             # "VNEQ"
WRAP_MAGIC = 0x50415257              # "WRAP"
_U64 = struct.Struct("=Q")
_WORD = struct.Struct("=I")
WORKING = 4 << 20


def _align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True, slots=True)
class Slot:
    pos: int            # where the entry starts (free-running)
    end: int            # where the next one may start
    seq: int
    ring_end: int | None


class QueueFile:
    """One run's queue file. create(): a new one of `size` data bytes; open(): a dead
    agent's, to resend (Shipper.recover). Not thread-safe: the shipper holds its lock."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self._fd = fd  # kept: trim() frees the file's pages
        self._map = mmap.mmap(fd, 0)
        self._view = memoryview(self._map)
        magic, self.size, _, _ = _HEAD.unpack_from(self._map, 0)
        if magic != MAGIC or self.size <= 0 or HEADER + self.size > len(self._map):
            self.close()
            raise ValueError(f"{path}: not a vnet queue file")
        # Pages the file has (tmpfs memory), page-rounded data bytes from the area's start:
        self._touched = 0  # every page below it written (and not given back): stores are safe there
        self._written = 0  # no page at or above it written: what trim() gives back
        self._jumped: tuple[int, int] | None = None  # (lap start, where the lap before ended): see append()

    @classmethod
    def create(cls, path: Path, size: int) -> "QueueFile":
        size = max(mmap.PAGESIZE, (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, HEADER + size)  # sparse: tmpfs gives pages as they are written
            os.pwrite(fd, _HEAD.pack(MAGIC, size, 0, 0), 0)
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def open(cls, path: Path) -> "QueueFile":
        fd = os.open(path, os.O_RDWR)
        try:
            return cls(path, fd)
        except BaseException:
            os.close(fd)
            raise

    @property
    def tail(self) -> int:
        return _U64.unpack_from(self._map, _TAIL_AT)[0]

    @property
    def head(self) -> int:
        return _U64.unpack_from(self._map, _HEAD_AT)[0]

    def _skip(self) -> tuple[int, int]:
        return _SKIP.unpack_from(self._map, _SKIP_AT)

    def _gap(self, tail: int, head: int) -> int:
        """Bytes of [tail, head) that the walk skips (free, not queued)."""
        frm, to = self._skip()
        return to - frm if tail <= frm < to <= head else 0

    def queued_bytes(self) -> int:
        tail, head = self.tail, self.head
        return head - tail - self._gap(tail, head)

    def append(self, seq: int, head: bytes, records, ring_end: int | None, floor: int | None = None) -> Slot | None:
        """The entry at head, or None when it does not fit (the caller spools it). `floor`: a
        position below tail still being read (an entry being sent when it was released)."""
        nbytes = memoryview(records).nbytes if records is not None else 0
        need = _align8(ENTRY.size + len(head) + nbytes)
        tail, pos = self.tail, self.head
        low = tail if floor is None else min(tail, floor)
        if pos == low and pos % self.size:  # empty: begin at the area's start again
            pos = pos + self.size - pos % self.size
            _U64.pack_into(self._map, _TAIL_AT, pos)
            _U64.pack_into(self._map, _HEAD_AT, pos)
            low = pos
        off = pos % self.size
        start = pos if off + need <= self.size else pos + self.size - off  # never across the end
        if start == pos and off and off + need > WORKING and pos - low + need <= WORKING \
                and pos + self.size - off + need - low <= self.size and not self._escaping(low):
            # Past the working bytes: the next lap, where the beginning is free, if what is queued
            # is small (fits in them with it). Not otherwise: the entries after it would run into
            # the ones still queued here, with the rest of the area unused, and go to the disk
            # spool (every other 10 MB chunk did at high rates).
            self._jumped = (pos + self.size - off, off)
            start = pos + self.size - off
        skip = None
        if need > self.size:
            return None
        if start + need - low > self.size and not self._in_escape(low, start, need):
            # After a jump back, the entries still queued in the lap before block the way (the
            # collector stalled): go on past them, in this lap, where that lap ended. The walk
            # from here goes on there (the header's skip): the area's rest, not the disk spool.
            frm, to = self._skip()
            if self._jumped is None or start != pos or not low < self._jumped[0] <= pos or low <= frm < to:
                return None  # (the header has room for one skip: the walk has not passed the last yet)
            lap, ended = self._jumped
            ended += 8  # past the lap before's WRAP word: its walk reads it
            if ended + need > self.size:
                return None
            skip, start = (pos, lap + ended), lap + ended
        entry = ENTRY.pack(ENTRY_MAGIC, len(head), seq, nbytes, -1 if ring_end is None else ring_end) + head
        try:
            self._put(start % self.size, [entry, memoryview(records).cast("B")] if nbytes else [entry])
            if skip is None and start != pos:  # where the lap before ended
                self._put(off, [_WORD.pack(WRAP_MAGIC)])
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.ENOMEM):
                return None  # tmpfs full: the spool takes it (nothing here changed: head did not move)
            raise
        if skip is not None:
            _SKIP.pack_into(self._map, _SKIP_AT, *skip)  # (the header page, written at create)
        _U64.pack_into(self._map, _HEAD_AT, start + need)  # last: the entry is whole
        return Slot(start, start + need, seq, ring_end)

    def _put(self, data_off: int, parts: list) -> None:
        """The parts, one after the other, at data_off in the area. On pages the file has (written
        before, not given back: the working bytes of a queue that keeps up) as stores through the
        mapping: hot and mapped, a memcpy (pwritev's work per page cost 0.04 us/event more at
        500 k events/s). Past them with pwritev: a fresh tmpfs page is filled by the kernel's
        copy, where a store faults each page in and has it cleared first (a third less of the
        agent's CPU reading a backlog, tools/bench/drain.py), and a tmpfs without room says
        ENOSPC where a store is killed by SIGBUS. One page cache: the mapping reads either."""
        want = sum(memoryview(p).nbytes for p in parts)
        if data_off + want <= self._touched:
            at = HEADER + data_off
            for p in parts:
                n = memoryview(p).nbytes
                self._view[at:at + n] = p
                at += n
            return
        done = os.pwritev(self._fd, parts, HEADER + data_off)
        end = -(-(data_off + done) // mmap.PAGESIZE) * mmap.PAGESIZE
        self._written = max(self._written, end)
        if data_off <= self._touched:  # (always, as entries are placed: none begins past the pages it has)
            self._touched = max(self._touched, end)
        if done != want:  # a write cut short only by a full file system
            raise OSError(errno.ENOSPC, f"{done} of {want} bytes written")

    def _escaping(self, low: int) -> bool:
        """Entries of the lap before a skip are still queued (the area is not one run from tail)."""
        frm, to = self._skip()
        return frm < to and low < to - to % self.size

    def _in_escape(self, low: int, start: int, need: int) -> bool:
        """[start, start + need) is in the part of a lap past a skip, while the lap before it
        still holds entries: free there (they lie before where that lap ended)."""
        frm, to = self._skip()
        lap = to - to % self.size
        return frm < to and low < lap and to <= start and start + need <= lap + self.size

    def read(self, slot: Slot) -> tuple[memoryview, memoryview | None]:
        """The entry's msgpack head and its records: views of the mapping (valid until released)."""
        at = HEADER + slot.pos % self.size
        _, hlen, _, nbytes, _ = ENTRY.unpack_from(self._map, at)
        at += ENTRY.size
        return self._view[at:at + hlen], (self._view[at + hlen:at + hlen + nbytes] if nbytes else None)

    def release(self, slot: Slot) -> None:
        """The entry and every one before it acknowledged: their space is free."""
        tail = slot.end
        if tail <= self.tail:
            return
        off = tail % self.size
        frm, to = self._skip()
        if tail == frm < to:
            tail = to  # first: nothing was written where the skip begins
        elif tail < self.head and off and (self.size - off < ENTRY.size
                                           or _WORD.unpack_from(self._map, HEADER + off)[0] == WRAP_MAGIC):
            tail += self.size - off  # the next entry began the next lap: the gap is free too
        _U64.pack_into(self._map, _TAIL_AT, tail)

    def entries(self) -> list[Slot]:
        """The whole entries between tail and head (a dead agent's queue)."""
        out, pos, head = [], self.tail, self.head
        frm, to = self._skip()
        lap, gap = to - to % self.size, self._gap(pos, head)
        if gap and pos < lap:  # a skip past the lap before's entries: to the end of its own
            fits = lap - self.size <= pos and head <= lap + self.size
        else:
            fits = 0 <= head - pos - gap <= self.size
        if not fits:
            raise ValueError(f"{self.path}: tail {pos} and head {head} do not fit a {self.size}-byte area")
        while pos < head:
            if pos == frm < to:
                pos = to
                continue
            off = pos % self.size
            if self.size - off < ENTRY.size or _WORD.unpack_from(self._map, HEADER + off)[0] == WRAP_MAGIC:
                pos += self.size - off
                continue
            magic, hlen, seq, nbytes, ring_end = ENTRY.unpack_from(self._map, HEADER + off)
            end = pos + _align8(ENTRY.size + hlen + nbytes)
            if magic != ENTRY_MAGIC or off + (end - pos) > self.size or end > head:
                raise ValueError(f"{self.path}: damaged entry at {pos}")
            out.append(Slot(pos, end, seq, None if ring_end < 0 else ring_end))
            pos = end
        return out

    def trim(self, keep: int = WORKING, most: int | None = None) -> bool:
        """Empty after a backlog: give back the area's pages beyond the first `keep` bytes
        (tmpfs memory, and this process's resident set), at most `most` bytes of them at a time,
        from the top. Whether anything was given."""
        start = -(-keep // mmap.PAGESIZE) * mmap.PAGESIZE
        if self.head != self.tail or self._written <= start:
            return False
        if most is not None:
            start = max(start, self._written - max(mmap.PAGESIZE, most // mmap.PAGESIZE * mmap.PAGESIZE))
        self._map.madvise(mmap.MADV_REMOVE, HEADER + start, self._written - start)
        self._written, self._touched = start, min(self._touched, start)
        return True

    def close(self, drop: bool = False) -> None:
        """`drop`: its content is not needed (delivered or spooled): the pages go at once,
        even while a view of them is still out (the mapping then goes with the view)."""
        if self._fd < 0:
            return
        if drop:
            self._map.madvise(mmap.MADV_REMOVE, 0, len(self._map))
        self._view.release()
        try:
            self._map.close()
        except BufferError:  # a view is still out (a send in progress): unmapped when it goes
            pass
        os.close(self._fd)
        self._fd = -1
