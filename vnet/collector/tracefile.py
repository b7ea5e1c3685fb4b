"""The trace file: what one host's agent shipped, as the collector wrote it.

    file   = magic b"VNETTRC\\0" (8 bytes), format version (u16 LE), chunk*
    chunk  = payload length (u32 LE), crc32 of the payload (u32 LE), payload
    payload = one msgpack map {"kind": str, "seq": int, ...}

Chunks are appended and never changed (a direct writer writes a partial last block
again, the same bytes first): after a crash every complete chunk reads back, and a
torn last one is reported and ignored.

Kinds (readers skip kinds they do not know; new fields may appear in any):
    header  first chunk of every file (again after each rotation): "format",
            "part" (0, 1, ... across rotations), "abi" (the record layouts and
            enums from the objects' BTF, so a file decodes without them), host,
            kernel, trace, probes and the hook each used, labels (probe_id,
            hook -> probe names), filter, clock ("wall_offset_ns": add it to an
            event's ts_ns for UTC ns), ifnames, drop_reasons
    events  "records": a ring batch (vnet.binding.ringbatch framing), "count"
    stats   kernel counters: "per_cpu" {"seen": [per CPU], "emitted", "lost",
            "filtered"}, "mono_ns" when read (stats_fields())
    clock   a later estimate of the agent's clock against the collector's
    gap     "first".."last": sequence numbers that never arrived
    end     final summary: "events" read, "chunks", "kernel" counters, "losses" per stage
    interrupted  written by the collector when a restarted agent has resent what its
            dead predecessor spooled: "reason", "after" (the last chunk there is), and
            "kernel" (the kernel's "seen", "emitted", "lost", "filtered" when the agent died,
            every probe and CPU summed; "frozen": false if clsact hooks counted on after it)
            or "kernel_unknown" (why not: no bpffs to pin them on, an older agent)
    dropped  the agent's spool was full: "events" of chunk "seq" are gone (agent_spool_full)

seq is the number the agent gave the chunk; chunks the writer is given none
for (the header, the collector's gap and clock) carry the last one written:
they come after that chunk (-1: before any).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgpack

from vnet.binding import Field, StructLayout
from vnet.binding.btf import STRUCT
from vnet.binding.checksum import crc32
from vnet.binding.ringbatch import records
from vnet.errors import UnsupportedError, UsageError
from vnet.packing import pack_parts, parts_size

MAGIC = b"VNETTRC\x00"
FORMAT_VERSION = 1
PREAMBLE = struct.Struct("<8sH")
FRAME = struct.Struct("<II")  # payload length, crc32
MAX_CHUNK_BYTES = 64 << 20    # a corrupt length must not make a reader allocate more
MAX_STR_BYTES = 1 << 20
MAX_ITEMS = 1 << 20
MAX_CLOCK_NS = 1 << 62        # clock values past it (146 years) are damage, not time (int64 analysis)
ABI_STRUCTS = ("vnet_event", "vnet_event_more", "vnet_sched_event")
ABI_ENUMS = ("vnet_hook", "vnet_event_flag", "vnet_event_kind", "vnet_stat")


def _pack(payload: dict) -> bytes:
    return msgpack.packb(payload, use_bin_type=True)


def _unpack(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=MAX_CHUNK_BYTES,
                           max_str_len=MAX_STR_BYTES, max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS,
                           max_ext_len=MAX_STR_BYTES)


def _unpack_views(payload: bytes) -> Any:
    """_unpack for a flat map (str keys; str, int, float, bool, nil or bin values, as
    events chunks are): bin values come back as memoryviews of the payload instead
    of copies. Anything else is left to msgpack."""
    try:
        return _flat_map(payload)
    except _NotFlat:
        return _unpack(payload)


class _NotFlat(Exception):
    pass


_FIXED = {0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q", 0xd0: ">b", 0xd1: ">h", 0xd2: ">i", 0xd3: ">q",
          0xcb: ">d", 0xca: ">f"}


def _flat_map(b: bytes) -> dict:
    view = memoryview(b)
    end = len(b)

    def item(pos: int) -> tuple[Any, int]:
        t = b[pos]
        if t < 0x80:
            return t, pos + 1
        if t >= 0xe0:
            return t - 0x100, pos + 1
        if 0xa0 <= t <= 0xbf or t in (0xd9, 0xda):
            if t <= 0xbf:
                n, pos = t & 0x1f, pos + 1
            else:
                w = 1 if t == 0xd9 else 2
                n, pos = int.from_bytes(b[pos + 1:pos + 1 + w], "big"), pos + 1 + w
            if pos + n > end or n > MAX_STR_BYTES:
                raise _NotFlat
            return str(b[pos:pos + n], "utf-8"), pos + n
        if t in (0xc4, 0xc5, 0xc6):
            w = 1 << (t - 0xc4)
            n, pos = int.from_bytes(b[pos + 1:pos + 1 + w], "big"), pos + 1 + w
            if pos + n > end:
                raise _NotFlat
            return view[pos:pos + n], pos + n
        if t in _FIXED:
            fmt = _FIXED[t]
            size = struct.calcsize(fmt)
            if pos + 1 + size > end:
                raise _NotFlat
            return struct.unpack_from(fmt, b, pos + 1)[0], pos + 1 + size
        if t in (0xc0, 0xc2, 0xc3):
            return (None, False, True)[(0xc0, 0xc2, 0xc3).index(t)], pos + 1
        raise _NotFlat

    if not b:
        raise _NotFlat
    t = b[0]
    if 0x80 <= t <= 0x8f:
        n, pos = t & 0x0f, 1
    elif t == 0xde and end >= 3:
        n, pos = int.from_bytes(b[1:3], "big"), 3
    else:
        raise _NotFlat
    out = {}
    try:
        for _ in range(n):
            key, pos = item(pos)
            if not isinstance(key, str):
                raise _NotFlat
            out[key], pos = item(pos)
    except (IndexError, UnicodeDecodeError):
        raise _NotFlat from None
    if pos != end:
        raise _NotFlat
    return out


MAP_STEP = 16 << 20  # mapped reading: how far ahead it asks for pages, how far behind it lets go


def _madvise(mm: mmap.mmap, advice: int, start: int, length: int) -> None:
    if length > 0:
        try:
            mm.madvise(advice, start, length)
        except (OSError, ValueError):
            pass  # advice only


def _peek_kind(head: bytes) -> str | None:
    """The "kind" of a chunk from its first bytes when it is the map's first key, else None."""
    u = msgpack.Unpacker(max_buffer_size=64, max_str_len=32, max_bin_len=0, max_array_len=0, max_map_len=0)
    u.feed(head)
    try:
        u.read_map_header()
        if u.unpack() == "kind":
            kind = u.unpack()
            return kind if isinstance(kind, str) else None
    except Exception:  # noqa: BLE001 - not a map, cut short, or another first key
        return None
    return None


def _peek_head(head: bytes) -> tuple[str, int | None, int | None] | None:
    """(kind, seq, count) from a chunk's first bytes: kind first, then seq, then an events
    chunk's count (as the writers put them); None where they are not there in that order."""
    u = msgpack.Unpacker(max_buffer_size=128, max_str_len=32, max_bin_len=0, max_array_len=0, max_map_len=0)
    u.feed(head)
    try:
        u.read_map_header()
        if u.unpack() != "kind":
            return None
        kind = u.unpack()
        if not isinstance(kind, str) or u.unpack() != "seq":
            return None
        seq = u.unpack()
        count = None
        if kind == "events" and u.unpack() == "count":
            count = u.unpack()
            count = count if isinstance(count, int) and not isinstance(count, bool) else None
    except Exception:  # noqa: BLE001 - cut short, or another order
        return None
    return kind, seq, count


def rotated_paths(path: str | os.PathLike) -> list[Path]:
    """path, path.1, path.2, ... as far as they exist: one rotated series, in order."""
    base = Path(path)
    out = []
    while (p := base if not out else base.with_name(f"{base.name}.{len(out)}")).exists():
        out.append(p)
    return out


# -- writing --------------------------------------------------------------------------------------------


DIRECT_ALIGN = 4096   # offset, length and memory alignment of direct writes: any device's logical block
STAGE_KEPT = 1 << 20  # a direct writer's staging area between large chunks (it grows to the largest)


class _DirectAppender:
    """Appends to a file the page cache does not copy: whole aligned blocks are written from
    an aligned staging area with O_DIRECT, the last partial block through the page cache (so
    every byte is in the file once append() returns, as before), and kept staged until the next
    append completes its block and writes it again directly, with the same bytes first. One
    descriptor, O_DIRECT set around the direct part (fcntl), so a stream costs no more of them.
    Why: on a collector taking millions of events a second the copy into the page cache is
    most of its CPU, 10x the direct write's on this machine (docs/benchmarks.md). The staging
    copy is into memory that stays mapped, so it costs what a memcpy does."""

    def __init__(self, fd: int):
        self.fd = fd
        self._flags = fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT
        self.aligned = 0     # the file below it is written and not staged
        self._staged = 0     # the bytes of the file past `aligned`, also in the stage
        self._stage = mmap.mmap(-1, STAGE_KEPT)

    @classmethod
    def of(cls, fd: int) -> "_DirectAppender | None":
        """None where the file system has no direct I/O (the writes all go through the page cache)."""
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        return cls(fd)

    def _room(self, need: int) -> None:
        if need > len(self._stage):
            grown = mmap.mmap(-1, (need + STAGE_KEPT - 1) & ~(STAGE_KEPT - 1))
            grown[:self._staged] = self._stage[:self._staged]
            _unmap(self._stage)
            self._stage = grown

    def _pwrite_all(self, data: memoryview, offset: int) -> None:
        while data:
            n = os.pwrite(self.fd, data, offset)
            if not n:
                raise OSError(errno.EIO, "a write wrote nothing")
            data, offset = data[n:], offset + n

    def _write_direct(self, data: memoryview) -> None:
        """data (whole blocks) at self.aligned, around the page cache."""
        fcntl.fcntl(self.fd, fcntl.F_SETFL, self._flags | os.O_DIRECT)
        try:
            done = 0
            while done < data.nbytes:
                n = os.pwrite(self.fd, data[done:], self.aligned + done)
                done += n
                if not n or n % DIRECT_ALIGN:  # short, off the block size: the rest through the cache
                    break
        finally:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self._flags)
        self._pwrite_all(data[done:], self.aligned + done)

    def append(self, views: list[memoryview], total: int) -> None:
        """views (total bytes) after what is in the file; on an OSError the file may hold
        part of them: the caller cuts it back to its size before (truncated())."""
        self._room(self._staged + total)
        stage = memoryview(self._stage)
        try:
            at = self._staged
            for v in views:
                stage[at:at + v.nbytes] = v if v.format == "B" and v.ndim == 1 else v.cast("B")
                at += v.nbytes
            whole = at - at % DIRECT_ALIGN
            if not whole:
                self._pwrite_all(stage[self._staged:at], self.aligned + self._staged)
                self._staged = at
                return
            self._write_direct(stage[:whole])
            self._pwrite_all(stage[whole:at], self.aligned + whole)
            stage[:at - whole] = stage[whole:at]
            self.aligned += whole
            self._staged = at - whole
        finally:
            stage.release()

    def trim(self) -> None:
        """Give back a stage grown for large chunks (a stream whose agent went quiet)."""
        if len(self._stage) > STAGE_KEPT:
            small = mmap.mmap(-1, STAGE_KEPT)
            small[:self._staged] = self._stage[:self._staged]
            _unmap(self._stage)
            self._stage = small

    def truncated(self, size: int) -> None:
        """The file was cut back to `size` (a failed append): what stays staged."""
        if size < self.aligned:  # never happens: appends only cut back their own bytes
            raise ValueError("cut below the direct-written part")
        self._staged = size - self.aligned

    def close(self) -> None:
        _unmap(self._stage)


def _unmap(m: mmap.mmap) -> None:
    try:
        m.close()
    except BufferError:  # a view is still held (an exception's traceback): unmapped when it goes
        pass


class TraceFileWriter:
    """Appends chunks to `path`; with rotate_bytes, a file that would grow past it
    is closed and the next one (path.1, path.2, ...) begins with the header again.
    Refuses to overwrite an existing trace. direct: write around the page cache where the
    file system can (_DirectAppender); `direct_io` says whether it does."""

    def __init__(self, path: str | os.PathLike, header: dict, rotate_bytes: int | None = None,
                 direct: bool = False):
        if rotate_bytes is not None and rotate_bytes <= 0:
            raise UsageError(f"rotate size must be positive, got {rotate_bytes}")
        self.path = Path(path)
        for p in (self.path, self.path.with_name(f"{self.path.name}.1")):
            if p.exists():
                raise UsageError(f"trace file {p} already exists")
        self.header = {k: v for k, v in header.items() if k not in ("kind", "seq", "format", "part")}
        _pack(self.header)  # fails now, not at the first rotation, if it cannot be stored
        self.rotate_bytes = rotate_bytes
        self.last_seq = -1
        self.part = -1
        self.paths: list[Path] = []
        self._fd: int | None = None
        self._size = 0
        self._header_size = 0
        self._headed = False
        self._rotating = False   # between closing a full file and having its successor's header
        self.direct = direct
        self._direct: _DirectAppender | None = None
        self._open_next()

    @property
    def direct_io(self) -> bool:
        return self._direct is not None

    def __enter__(self) -> "TraceFileWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._fd is None

    def _open_next(self) -> None:
        part = self.part + 1
        path = self.path if part == 0 else self.path.with_name(f"{self.path.name}.{part}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if part == 0 else os.O_TRUNC)
        self._fd = os.open(path, flags, 0o644)
        if self.direct:
            self._direct = _DirectAppender.of(self._fd)
            self.direct = self._direct is not None  # not for the next files either
        self.part = part
        self.paths.append(path)
        self._size = 0
        self._headed = False
        _fsync_dir(path.parent)  # the new name survives a power loss, not only its data
        try:
            self._write_head()
        except OSError:
            if part == 0:  # no trace file rather than an empty one (the caller may try again)
                self._close_direct()
                os.close(self._fd)
                self._fd, self.part = None, -1
                self.paths.pop()
                path.unlink(missing_ok=True)
            raise

    def _write_head(self) -> None:
        """Preamble and header, whole or not at all (a full disk: write() tries again first)."""
        self._write_all([PREAMBLE.pack(MAGIC, FORMAT_VERSION),
                         *self._frame({"kind": "header", "seq": self.last_seq, "format": FORMAT_VERSION,
                                       "part": self.part, **self.header})])
        self._headed = True
        self._header_size = self._size

    @staticmethod
    def _frame(payload: dict) -> list:
        """The chunk as the pieces of one writev: frame and msgpack head, then a large
        last value (an events chunk's records) where it is, not copied (vnet/packing.py)."""
        head, blob = pack_parts(payload)
        size = parts_size(head, blob)
        if size > MAX_CHUNK_BYTES:
            raise UsageError(f"trace chunk of {size} bytes is over the {MAX_CHUNK_BYTES}-byte limit")
        crc = crc32(head)
        if blob is None:
            return [FRAME.pack(size, crc) + head]
        return [FRAME.pack(size, crc32(blob, crc)) + head, blob]

    def _write_all(self, data: bytes | list) -> None:
        views = [memoryview(p) for p in ([data] if isinstance(data, bytes) else data)]
        total = sum(v.nbytes for v in views)
        if self._direct is not None:
            try:
                self._direct.append(views, total)
            except OSError as e:
                os.ftruncate(self._fd, self._size)
                self._direct.truncated(self._size)
                if e.errno != errno.EINVAL:
                    raise
                # a device with stricter alignment than ours: through the page cache from here on
                self._close_direct()
                self.direct = False
                os.lseek(self._fd, self._size, os.SEEK_SET)
                return self._write_all(data)
            self._size += total
            return
        try:
            while views:
                n = os.writev(self._fd, views)
                while views and n >= views[0].nbytes:
                    n -= views.pop(0).nbytes
                if n:
                    views[0] = views[0][n:]
        except OSError:
            # Disk full or the like: cut the torn chunk off, so that later ones stay reachable.
            os.ftruncate(self._fd, self._size)
            os.lseek(self._fd, self._size, os.SEEK_SET)
            raise
        self._size += total

    def write(self, kind: str, **fields) -> None:
        """One chunk; `seq` among the fields numbers it, else it gets the last number written."""
        if self._fd is None and not self._rotating:
            raise ValueError("write to a closed trace file")
        seq = fields.pop("seq", None)
        if seq is None:
            seq = self.last_seq
        self.write_frame(self._frame({"kind": kind, "seq": seq, **fields}), seq)

    @classmethod
    def frame(cls, kind: str, seq: int, /, **fields) -> list:
        """What write(kind, seq=seq, **fields) writes, CRC computed, for write_frame(): so that
        one thread can frame a chunk (the CRC-32 over ~10 MB) while another writes the one before."""
        return cls._frame({"kind": kind, "seq": seq, **fields})

    def write_frame(self, frame: list, seq: int) -> None:
        if self._fd is None and not self._rotating:
            raise ValueError("write to a closed trace file")
        # a full disk may have stopped the last rotation before its file or its header
        if self._rotating and self._fd is None:
            self._open_next()
        elif not self._headed:
            self._write_head()
        self._rotating = False
        if (self.rotate_bytes is not None and self._size + sum(memoryview(p).nbytes for p in frame) > self.rotate_bytes
                and self._size > self._header_size):
            self._finish_file()
            self._rotating = True
            self._open_next()
            self._rotating = False
        self._write_all(frame)  # one writev: a crash leaves this chunk whole or torn, never the earlier ones
        self.last_seq = seq

    def trim(self) -> None:
        """Memory held for writing large chunks goes back (the writer stays open)."""
        if self._direct is not None:
            self._direct.trim()

    def fsync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def _close_direct(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def _finish_file(self) -> None:
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            self._close_direct()
            os.close(fd)

    def close(self) -> None:
        if self._fd is not None:
            self._finish_file()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading --------------------------------------------------------------------------------------------


_TORN = object()  # _whole(): the frame's checksum is wrong (the file is damaged from there on)


def _frames(f) -> Iterator[tuple[int, int, int]]:
    """(payload offset, length, crc) of each whole frame after the preamble, the file positioned
    at the payload; ends at a torn or oversized frame."""
    size = os.fstat(f.fileno()).st_size
    offset = PREAMBLE.size
    while offset + FRAME.size <= size:
        f.seek(offset)
        length, crc = FRAME.unpack(f.read(FRAME.size))
        if length > MAX_CHUNK_BYTES or offset + FRAME.size + length > size:
            return
        yield offset + FRAME.size, length, crc
        offset += FRAME.size + length


def _whole(f, at: int, length: int, crc: int):
    """A frame's payload read and decoded: the chunk, None when it is whole but no msgpack, or
    _TORN when its checksum is wrong."""
    f.seek(at)
    payload = f.read(length)
    if crc32(payload) != crc:
        return _TORN
    try:
        return _unpack(payload)
    except Exception:  # noqa: BLE001 - the frame is whole: stepped over
        return None


class TraceFileReader:
    """One trace file: .header, then its chunks. A torn or corrupt tail stops
    reading cleanly: after iterating, .truncated is set, .ignored_bytes says how
    much was left unread and .problem why. A newer format is a UsageError."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.truncated = False
        self.ignored_bytes = 0
        self.problem: str | None = None
        self.skipped = 0  # whole chunks (good crc) that were not a readable map
        self.bad_chunks = 0  # events chunks whose records did not decode to the end (events())
        self.header: dict | None = None
        with open(self.path, "rb") as f:
            pre = f.read(PREAMBLE.size)
            if not MAGIC.startswith(pre[:len(MAGIC)]):
                raise UsageError(f"{self.path} is not a vnet trace file")
            self.version = PREAMBLE.unpack(pre)[1] if len(pre) == PREAMBLE.size else 0
            if len(pre) < PREAMBLE.size:  # created, then the writer died: nothing to read
                self._stop(0, len(pre), "the file ends inside its preamble")
                return
            if self.version > FORMAT_VERSION:
                raise UsageError(f"trace file {self.path} is format v{self.version}, this vnet reads up to "
                                 f"v{FORMAT_VERSION}: upgrade vnet")
            if self.version < 1:
                raise UsageError(f"{self.path} is not a vnet trace file (format v{self.version})")
            first = next(self._chunks(f), None)
        if first is not None and first.get("kind") != "header":
            raise UsageError(f"trace file {self.path} does not start with a header chunk")
        if first is None and not self.truncated:
            self._stop(PREAMBLE.size, 0, "the file ends before its header")
        self.header = first  # None: the header itself is torn (.truncated says so)

    def _stop(self, offset: int, ignored: int, why: str) -> None:
        self.truncated = True
        self.ignored_bytes = ignored
        self.problem = f"{self.path}: {why} at byte {offset}; {ignored} bytes ignored"

    def _chunks(self, f, views: bool = False) -> Iterator[dict]:
        size = os.fstat(f.fileno()).st_size
        offset = f.tell()
        self.skipped = 0
        while True:
            frame = f.read(FRAME.size)
            if not frame:
                return
            if len(frame) < FRAME.size:
                return self._stop(offset, size - offset, "a chunk header is cut short")
            length, crc = FRAME.unpack(frame)
            if length > MAX_CHUNK_BYTES:
                return self._stop(offset, size - offset, f"a chunk claims {length} bytes (limit {MAX_CHUNK_BYTES})")
            if length > size - offset - FRAME.size:
                return self._stop(offset, size - offset, "the last chunk is cut short")
            payload = f.read(length)
            if len(payload) < length:  # the file shrank while we read
                return self._stop(offset, size - offset, "the last chunk is cut short")
            if crc32(payload) != crc:
                return self._stop(offset, size - offset, "a chunk's checksum does not match")
            offset += FRAME.size + length
            chunk = self._whole_chunk(payload, views)
            if chunk is not None:
                yield chunk

    def _mapped_chunks(self) -> Iterator[dict]:
        """_chunks(views=True) over the file mapped into memory: no copy from the page
        cache; the chunks' memoryviews point into the mapping, which closes when the
        last of them is gone (the file only grows: the mapping covers it as it was)."""
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= PREAMBLE.size:
                return
            mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
        data = memoryview(mm)  # unmapped when the last view of it is gone
        offset = PREAMBLE.size
        self.skipped = 0
        ahead = behind = 0  # [behind, ahead): the part mapped in (read ahead, let go behind)
        while offset < size:
            if offset >= ahead - MAP_STEP // 2:  # the next stretch: read ahead in the kernel
                start = offset & ~(mmap.PAGESIZE - 1)
                ahead = min(size, start + MAP_STEP)
                _madvise(mm, mmap.MADV_WILLNEED, start, ahead - start)
            if offset - behind > 2 * MAP_STEP:  # what lies well behind: out of this process's memory
                # (the pages stay in the page cache; a view still reading them faults them back in)
                end = (offset - MAP_STEP) & ~(mmap.PAGESIZE - 1)
                _madvise(mm, mmap.MADV_DONTNEED, behind, end - behind)
                behind = end
            if size - offset < FRAME.size:
                return self._stop(offset, size - offset, "a chunk header is cut short")
            length, crc = FRAME.unpack_from(data, offset)
            if length > MAX_CHUNK_BYTES:
                return self._stop(offset, size - offset,
                                  f"a chunk claims {length} bytes (limit {MAX_CHUNK_BYTES})")
            if length > size - offset - FRAME.size:
                return self._stop(offset, size - offset, "the last chunk is cut short")
            payload = data[offset + FRAME.size:offset + FRAME.size + length]
            if crc32(payload) != crc:
                return self._stop(offset, size - offset, "a chunk's checksum does not match")
            offset += FRAME.size + length
            chunk = self._whole_chunk(payload, True)
            if chunk is not None:
                yield chunk

    def _whole_chunk(self, payload, views: bool) -> dict | None:
        """A frame that arrived whole (crc checked): its chunk, or None (counted in
        .skipped) when it is not a map with a kind and a seq: it is stepped over."""
        try:
            chunk = _unpack_views(payload) if views else _unpack(payload)
        except Exception:  # noqa: BLE001 - the frame is whole: step over it
            chunk = None
        if not isinstance(chunk, dict) or not isinstance(chunk.get("kind"), str) \
                or not isinstance(chunk.get("seq"), int):
            self.skipped += 1
            return None
        return chunk

    def chunks(self, kinds: Iterable[str] | None = None, views: bool = False) -> Iterator[dict]:
        """Every chunk (the header too), or those of `kinds`; kinds a reader does
        not know must be skipped by it, not treated as errors. With views, binary
        fields of flat chunks are memoryviews of the chunk (no copy)."""
        wanted = set(kinds) if kinds is not None else None
        if self.header is None:
            return
        self.truncated, self.ignored_bytes, self.problem = False, 0, None
        if views:
            yield from (c for c in self._mapped_chunks() if wanted is None or c["kind"] in wanted)
            return
        with open(self.path, "rb") as f:
            f.seek(PREAMBLE.size)
            for chunk in self._chunks(f, views):
                if wanted is None or chunk["kind"] in wanted:
                    yield chunk

    __iter__ = chunks

    def scan(self, kinds: Iterable[str]) -> Iterator[dict]:
        """Only the chunks of `kinds`, found without reading the others: the writer puts
        "kind" first in every chunk, so a few bytes of each tell (a chunk that does not
        say so early is read whole). For small side chunks (clock estimates) before the
        events are read; a torn tail simply ends the scan (chunks() reports it)."""
        wanted = set(kinds)
        if self.header is None:
            return
        with open(self.path, "rb") as f:
            for at, length, crc in _frames(f):
                kind = _peek_kind(f.read(min(length, 32)))
                if kind is not None and kind not in wanted:
                    continue
                chunk = _whole(f, at, length, crc)
                if chunk is _TORN:
                    return
                if isinstance(chunk, dict) and isinstance(chunk.get("kind"), str) and chunk["kind"] in wanted:
                    yield chunk

    def event_counts(self) -> Iterator[tuple[str, int, int]]:
        """(kind, seq, events) of every "events" chunk (its "count") and "dropped" marker, read
        from each chunk's first bytes (the writer puts kind, seq and count first), not its records."""
        if self.header is None:
            return
        with open(self.path, "rb") as f:
            for at, length, crc in _frames(f):
                head = _peek_head(f.read(min(length, 64)))
                if head is None or head[0] == "events" and head[2] is None or head[0] == "dropped":
                    c = _whole(f, at, length, crc)  # not said early (or a marker, small): read it whole
                    if c is _TORN:
                        return
                    head = (c.get("kind"), c.get("seq"), c.get("count") if c.get("kind") == "events"
                            else c.get("events")) if isinstance(c, dict) else None
                if head is not None and head[0] in ("events", "dropped") and isinstance(head[1], int) \
                        and isinstance(head[2], int) and not isinstance(head[2], bool):
                    yield head

    def events(self) -> Iterator[dict]:
        """Every event of the file, decoded with its header (wall_ns from its clock)."""
        if self.header is None:
            return
        decoder = event_decoder(self.header)
        bad: list[str] = []
        for chunk in self.chunks(("events",)):
            blob = chunk.get("records")
            if not isinstance(blob, bytes):
                bad.append(f"chunk {chunk.get('seq')}: no records")
                continue
            try:  # a bad frame or record ends its chunk (what came before it was good), not the file
                for raw in records(blob):
                    yield decoder.decode(raw)
            except (ValueError, struct.error) as e:
                bad.append(f"chunk {chunk.get('seq')}: {e}")
        if bad:
            self.bad_chunks = len(bad)
            why = f"{len(bad)} events chunk(s) could not be decoded to the end ({bad[0]})"
            self.problem = f"{self.problem}; {why}" if self.problem else f"{self.path}: {why}"


def killed_agent_losses(kernel: dict, written: int, spool_dropped: int = 0) -> dict:
    """Where the events the kernel emitted for a killed agent's run went: `written` are in the
    collector's files (every segment), `spool_dropped` the agent counted as its spool full
    ("dropped" chunks); every other one it had read from the ring (or left there) or held in
    its memory queue, and died with it. The ring's own losses are the kernel's counter."""
    return {"died_with_agent": kernel["emitted"] - written - spool_dropped, "kernel_ring_full": kernel["lost"],
            "agent_spool_full": spool_dropped}


def describe_killed_agent_losses(kernel: dict, written: int, spool_dropped: int = 0) -> str:
    """`vnet analyze`'s line for killed_agent_losses()."""
    loss = killed_agent_losses(kernel, written, spool_dropped)
    died = loss["died_with_agent"]
    if died == 0:  # its queued chunks and its ring were read out by the next start
        out = f"nothing died with the killed agent; kernel_ring_full {loss['kernel_ring_full']}"
    else:
        out = (f"died with the killed agent: {died} events (read from the ring or queued in its memory); "
               f"kernel_ring_full {loss['kernel_ring_full']}")
    if spool_dropped:
        out += f"; agent_spool_full {spool_dropped}"
    out += f" (the kernel emitted {kernel['emitted']}, the files hold {written})"
    if kernel.get("frozen") is False:
        out += ("; its clsact hooks outlived it and counted on until the restart, so this is an upper "
                "bound")
    elif died < 0:
        out += "; the files hold more than the kernel emitted: were other runs' files given as this run's?"
    return out


def stream_accounting(files: list[TraceFileReader]) -> list[str]:
    """What a host's files say was lost on the way, one line per finding: chunks that never
    reached the collector (gap), losses per stage the agent counted (end), an agent that died
    mid-trace (interrupted), or a stream without its end (still running, or cut off). Files
    of one run (header "run"; rotations and segments) are taken together; cheap: only these
    small chunks are read (scan)."""
    runs: dict = {}
    for f in files:
        if f.header is not None:
            runs.setdefault(f.header.get("run"), []).append(f)
    out = []
    for run, group in runs.items():
        name = f"run {run}" if run else str(group[0].path)
        ended, interrupted, at_death = False, False, None
        for f in group:
            for c in f.scan(("gap", "end", "interrupted")):
                if c["kind"] == "gap":
                    out.append(f"{name}: chunks {c.get('first')}..{c.get('last')} never reached the collector "
                               "(their events are missing and not counted)")
                elif c["kind"] == "interrupted":
                    interrupted = True
                    out.append(f"{name}: the agent died mid-trace after chunk {c.get('after')}: {c.get('reason')}")
                    if isinstance(c.get("kernel"), dict):
                        at_death = c["kernel"]
                    elif c.get("kernel_unknown"):
                        out.append(f"{name}: what died with the killed agent cannot be counted: "
                                   f"{c['kernel_unknown']}")
                elif c["kind"] == "end":
                    ended = True
                    losses = c.get("losses") if isinstance(c.get("losses"), dict) else {}
                    lost = {k: v for k, v in losses.items() if isinstance(v, int) and v}
                    if lost:
                        out.append(f"{name}: events lost before the collector: "
                                   + ", ".join(f"{k} {v}" for k, v in lost.items()))
        if at_death is not None and not ended and _counters_ok(at_death):
            written, dropped = run_event_counts(group)
            out.append(f"{name}: " + describe_killed_agent_losses(at_death, written, dropped))
        if run and not ended and not interrupted:  # an agent's stream (a -w file's end is the recorder's)
            out.append(f"{name}: no end record: the trace is still running, or its agent "
                       "stopped without finishing (killed, or cut off from the collector); what it had not "
                       "shipped is missing")
    return out


def _counters_ok(k: dict) -> bool:
    return all(isinstance(k.get(n), int) and not isinstance(k.get(n), bool) for n in ("emitted", "lost"))


def run_event_counts(files: list[TraceFileReader]) -> tuple[int, int]:
    """Events in the events chunks of these files (one run: every rotation and segment), each
    chunk once (a collector restarted mid-chunk may not write it twice, but a copy of a
    segment may be given twice), and the events of "dropped" markers (agent_spool_full)."""
    seen: dict[tuple[str, int], int] = {}
    for f in files:
        for kind, seq, n in f.event_counts():
            seen[(kind, seq)] = n
    return (sum(n for (kind, _), n in seen.items() if kind == "events"),
            sum(n for (kind, _), n in seen.items() if kind == "dropped"))


# -- the header: layouts and names that decode the records ----------------------------------------------


def layout_to_dict(layout: StructLayout) -> dict:
    return {"name": layout.name, "size": layout.size,
            "fields": [{"name": f.name, "offset": f.offset, "size": f.size, "fmt": f.fmt, "count": f.count,
                        "is_bytes": f.is_bytes} for f in layout.fields]}


def layout_from_dict(d: dict) -> StructLayout:
    """The inverse of layout_to_dict, checked: it comes from a file."""
    try:
        fields = [Field(str(f["name"]), int(f["offset"]), int(f["size"]), str(f["fmt"]), int(f.get("count", 1)),
                      bool(f.get("is_bytes", False))) for f in d["fields"]]
        layout = StructLayout(str(d["name"]), int(d["size"]), fields)
        pos = 0
        for f in fields:  # in order, apart, each as big as its type says, all inside the struct
            if f.offset < pos or f.size != struct.calcsize(f"={f.size}s" if f.is_bytes else f"={f.count}{f.fmt}"):
                raise ValueError(f"field {f.name} at {f.offset}, {f.size} bytes does not fit")
            pos = f.offset + f.size
        if pos > layout.size or layout.codec().size != layout.size:
            raise ValueError(f"fields end at {pos}, past the size {layout.size}")
    except (KeyError, TypeError, ValueError, struct.error, AttributeError, UnsupportedError) as e:
        raise UsageError(f"trace header: bad record layout ({e})") from None
    return layout


def abi_from_btf(btf) -> dict:
    """The record layouts and enums of an object's BTF, as the header stores them."""
    structs = {name: layout_to_dict(btf.struct(name)) for name in ABI_STRUCTS if btf.has(name, STRUCT)}
    enums = {}
    for name in ABI_ENUMS:
        try:
            enums[name] = btf.enum(name)
        except KeyError:
            pass
    return {"byteorder": sys.byteorder, "structs": structs, "enums": enums}


def labels_to_list(labels: dict) -> list[dict]:
    """Trace.labels ((probe_id, hook or None) -> fields) as msgpack can store it."""
    return [{"probe_id": probe_id, "hook": hook, **where} for (probe_id, hook), where in labels.items()]


def labels_from_list(items: list[dict]) -> dict:
    out = {}
    for item in items or ():
        where = dict(item)
        out[(where.pop("probe_id", None), where.pop("hook", None))] = where
    return out


class _StaticNames:
    """(netns cookie, ifindex) -> (name, netns) as the agent saw them when it started."""

    def __init__(self, rows):
        self._table = {(int(r[0]), int(r[1])): (r[2], r[3]) for r in rows or ()}

    def lookup(self, cookie: int, ifindex: int) -> tuple[str | None, str | None]:
        return self._table.get((cookie, ifindex), (None, None))


def event_decoder(header: dict, wall_offset_ns: int | None = None):
    """An EventDecoder from a header alone (no object file, no kernel of the traced host)."""
    from vnet.trace.records import EventDecoder

    abi = header.get("abi")
    if not isinstance(abi, dict) or not isinstance(abi.get("structs"), dict) or "vnet_event" not in abi["structs"]:
        raise UsageError("trace header has no record layout (abi)")
    if abi.get("byteorder", sys.byteorder) != sys.byteorder:
        raise UsageError(f"trace was written on a {abi['byteorder']}-endian host: decoding it here is not supported")
    structs = abi["structs"]
    sched = layout_from_dict(structs["vnet_sched_event"]) if "vnet_sched_event" in structs else None
    more = layout_from_dict(structs["vnet_event_more"]) if "vnet_event_more" in structs else None
    # every field below comes from a file: any shape it should not have is the header's fault
    try:
        if wall_offset_ns is None:
            wall_offset_ns = int((header.get("clock") or {}).get("wall_offset_ns", 0))
        reasons = {int(v): str(n) for v, n in header.get("drop_reasons") or ()}  # never this host's kernel's
        return EventDecoder(layout_from_dict(structs["vnet_event"]), abi.get("enums", {}),
                            labels_from_list(header.get("labels")), wall_offset_ns,
                            ifnames=_StaticNames(header.get("ifnames")), drop_reasons=reasons, sched_layout=sched,
                            more_layout=more)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UsageError(f"trace header: cannot decode events with it ({type(e).__name__}: {e})") from None


def decode_events(header: dict, records_blob: bytes, wall_offset_ns: int | None = None) -> list[dict]:
    """The events of one "events" chunk's records, decoded with the file's header."""
    decoder = event_decoder(header, wall_offset_ns)
    return [decoder.decode(raw) for raw in records(records_blob)]


def header_for_trace(trace, *, host: str | None = None, trace_name: str | None = None,
                     package: dict | None = None) -> dict:
    """Everything a started Trace knows that its events need to be read elsewhere."""
    from dataclasses import fields as dc_fields

    from vnet import __version__
    from vnet.trace.ifnames import InterfaceNames

    flt = trace.packet_filter
    criteria = {f.name: getattr(flt, f.name) for f in dc_fields(flt) if getattr(flt, f.name) is not None}
    names = InterfaceNames()
    names.refresh()
    header = {
        "trace": trace_name, "host": host or socket.gethostname(), "kernel": os.uname().release,
        "machine": os.uname().machine, "vnet": __version__,
        "abi": abi_from_btf(trace.btf),
        "probes": [{"probe": h.probe, "hook": h.kind} for h in trace.hooks],
        "skipped": [{"probe": p, "reason": r} for p, r in trace.skipped],
        "labels": labels_to_list(trace.labels),
        "filter": {k: list(v) if isinstance(v, tuple) else v for k, v in criteria.items()},
        "ring_bytes": trace.ring_bytes, "rings": len(trace.rings), "wakeup_every": trace.wakeup_every,
        "wakeup_bytes": trace.wakeup["wakeup_bytes"], "aggregate": trace.aggregate,
        "clock": {"wall_offset_ns": trace.decoder.wall_offset_ns, "mono_ns": time.monotonic_ns(),
                  "real_ns": time.time_ns()},
        "ifnames": [[cookie, ifindex, name, ns] for (cookie, ifindex), (name, ns) in names.snapshot().items()],
        "drop_reasons": _kernel_drop_reasons(),
    }
    if package is not None:
        header["request"] = package
    return header


def stats_fields(trace) -> dict:
    """A "stats" chunk's fields: the kernel's counters (seen, emitted, lost,
    filtered: enum vnet_stat) per CPU over all probes, and per probe, from one reading."""
    reading = trace.per_cpu_counters()
    per_cpu: dict[str, list[int]] = {}
    for counters in reading.values():
        for name, cpus in counters.items():
            column = per_cpu.setdefault(name, [0] * len(cpus))
            for cpu, n in enumerate(cpus):
                column[cpu] += n
    return {"mono_ns": time.monotonic_ns(), "per_cpu": per_cpu, "per_probe": trace.probe_stats(reading)}


def _kernel_drop_reasons() -> list[list]:
    from vnet.binding import Btf

    try:
        with Btf.vmlinux() as btf:
            names = btf.enum("skb_drop_reason")
    except Exception:  # noqa: BLE001 - no kernel BTF or no such enum: reasons stay numbers
        return []
    return [[v, k.removeprefix("SKB_DROP_REASON_")] for k, v in names.items()]


def vanished_fields(label: str, why: str) -> dict:
    """A "vanished" chunk's fields: a traced interface (or its netns) went away mid-trace,
    and its hooks with it; `at_ns` is UTC, `mono_ns` the host's clock of the events."""
    return {"iface": label, "why": why, "at_ns": time.time_ns(), "mono_ns": time.monotonic_ns()}


def describe_vanished(v: dict, host: str | None = None) -> str:
    """"host h1: iface ns1/eth0 vanished at 12:00:01.234 UTC (deleted): its hooks stopped"."""
    at = v.get("at_ns")
    when = (time.strftime("%H:%M:%S", time.gmtime(at / 1e9)) + f".{at // 1_000_000 % 1000:03d} UTC"
            if isinstance(at, int) else "an unknown time")
    who = f"host {host}: " if host else ""
    return f"{who}iface {v.get('iface')} vanished at {when} ({v.get('why')}): its hooks stopped"
