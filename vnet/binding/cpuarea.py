"""Read the programs' per-CPU event areas in batches, as RingBatchReader reads a ring.

Packet events go to an area only their CPU writes (bpf/src/vnet_common.bpf.h,
vnet_area_emit): no lock, no atomic, ~20 ns less an event than the ring's
reserve and commit (docs/benchmarks.md). The layout (vnet_event.h, enum vnet_area):

    vnet_areas      mmapable array of chunks, VNET_AREA_CHUNK bytes each; the i-th
                    online CPU's area is `chunks` of them from index i * chunks on,
                    one stretch of the mapping
    vnet_area_pos   mmapable array, one struct vnet_area_pos per possible CPU: `prod`,
                    where its programs have written to (free-running bytes), `cons`,
                    ours, `first_chunk`, where its area starts; `busy` is
                    VNET_AREA_NONE for a CPU that was offline at the start (it has no
                    area: its events go to the rings)

Records are in the ring's framing (ringbatch: a u32 length, a u32 the kernel
leaves 0 here, the record, padding to 8 bytes), and none crosses a chunk's end
(the verifier bounds a program's writes by the element): what a record would
not fit in is a discarded one. So a batch is the area's bytes as they are, up
to its end, and whatever reads ring batches (files, the agent's chunks,
analysis) reads these. Wakeups come through the rings: a program rings a
doorbell there (an empty record, discarded, with a forced wakeup), and
RingGroupReader waits on the rings for areas and rings alike.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct

from vnet.errors import UsageError, bpf_error

from .ringbatch import RingBatchReader


class AreaMapping:
    """Both arrays, mapped once for every CPU's reader; owned by the maps' object,
    so closing it unmaps them."""

    def __init__(self, areas_map, pos_map, chunk_bytes: int, pos_size: int):
        if areas_map.value_size != chunk_bytes:
            raise UsageError(f"{areas_map.name}: elements of {areas_map.value_size} bytes, not {chunk_bytes}")
        self.pos_stride = (pos_size + 7) & ~7
        self.chunk_bytes = chunk_bytes

        def size(n: int) -> int:
            return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE

        self.areas = mmap.mmap(areas_map.fd, size(chunk_bytes * areas_map.max_entries), mmap.MAP_SHARED,
                               mmap.PROT_READ)
        try:
            self.pos = mmap.mmap(pos_map.fd, size(self.pos_stride * pos_map.max_entries), mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self.areas.close()
            raise
        self.bytes = memoryview(self.areas)
        self.words = self.bytes.cast("I")  # record headers, by byte offset // 4
        self.positions = memoryview(self.pos).cast("Q")
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for view in (self.words, self.bytes, self.positions):
            view.release()
        for m in (self.areas, self.pos):
            try:
                m.close()
            except BufferError:  # a view is still out (another thread mid-read): unmapped when it goes
                pass


class AreaReader(RingBatchReader):
    """Batches from one CPU's area: RingBatchReader's peek/consume/read, pending and
    position. It has no descriptor to wait on: RingGroupReader waits on the rings, where
    the programs ring for the areas too."""

    def __init__(self, mapping: AreaMapping, name: str, cpu: int, first_chunk: int, chunks: int, prod_off: int,
                 cons_off: int):
        if chunks < 1 or chunks & (chunks - 1):
            raise UsageError(f"{name}: {chunks} chunks a CPU: not a power of two")
        self.map = _AreaName(f"{name}[cpu {cpu}]")
        self.size = chunks * mapping.chunk_bytes
        self._mask = self.size - 1
        self._data = first_chunk * mapping.chunk_bytes  # the area's first byte in the mapping
        self._m = mapping
        self._prod = (cpu * mapping.pos_stride + prod_off) // 8
        self._cons = (cpu * mapping.pos_stride + cons_off) // 8
        self.cpu = cpu
        self._init_reading()

    # -- the mapping's positions (the rest, peek and consume included, is RingBatchReader's:
    # no record crosses the area's end, so a batch never needs the ring's join) ----------------
    def _consumer(self, m) -> int:
        return m.positions[self._cons]

    def _producer(self, m) -> int:
        return m.positions[self._prod]

    def _set_position(self, m, pos: int) -> None:
        m.positions[self._cons] = pos

    def wait(self, timeout_ms: int) -> bool:
        raise UsageError(f"{self.map.name}: an area is waited for through the rings (RingGroupReader)")

    def _edge_poll(self, timeout_s: float) -> None:
        raise UsageError(f"{self.map.name}: an area is waited for through the rings (RingGroupReader)")

    @property
    def epoll_fd(self) -> int:
        raise UsageError(f"{self.map.name}: an area is waited for through the rings (RingGroupReader)")

    def close(self) -> None:
        """The mapping is the object's (every CPU's reader shares it): nothing of this reader's own."""


class _AreaName:
    """What RingBatchReader's messages name (`self.map.name`)."""

    def __init__(self, name: str):
        self.name = name


def online_cpus() -> list[int]:
    """The CPUs online now (/sys/devices/system/cpu/online: "0-3,6")."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            text = f.read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus += range(int(lo), int(hi or lo) + 1)
    return cpus


def area_readers(obj, chunks: int, cpus: list[int]) -> list[AreaReader]:
    """After load, before anything is attached: give each of `cpus` (online) its area of
    the object's vnet_areas, and every other possible CPU none; a reader for each area.
    vnet_areas has len(cpus) * chunks chunks, vnet_area_pos a position per possible CPU
    (sized before load). The mapping is owned by `obj`."""
    btf = obj.btf
    area = btf.enum("vnet_area")
    layout = btf.struct("vnet_area_pos")
    areas_map, pos_map = obj.maps["vnet_areas"], obj.maps["vnet_area_pos"]
    if areas_map.max_entries < len(cpus) * chunks or pos_map.max_entries <= max(cpus):
        raise UsageError(f"vnet_areas has {areas_map.max_entries} chunks and {pos_map.max_entries} positions: "
                         f"not {chunks} chunks for each of CPUs {cpus}")
    try:
        mapping = obj._own(AreaMapping(areas_map, pos_map, area["VNET_AREA_CHUNK"], layout.size))
    except OSError as e:
        raise bpf_error("mmap", e.errno or errno.EINVAL, "the event areas (vnet_areas)") from None
    word = {name: layout.field(name).offset for name in ("prod", "cons", "busy")}
    first = layout.field("first_chunk")
    slot = {cpu: i for i, cpu in enumerate(cpus)}
    for cpu in range(pos_map.max_entries):
        base = cpu * mapping.pos_stride
        if cpu in slot:
            struct.pack_into("=I", mapping.pos, base + first.offset, slot[cpu] * chunks)
        else:
            mapping.positions[(base + word["busy"]) // 8] = area["VNET_AREA_NONE"]
    return [AreaReader(mapping, "vnet_areas", cpu, slot[cpu] * chunks, chunks, word["prod"], word["cons"])
            for cpu in cpus]
