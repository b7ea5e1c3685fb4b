"""RingBatchReader on the real ring: the committed tc_trace object is loaded,
its program run with BPF_PROG_TEST_RUN (repeat counts up to 100k), and what
the reader copies out is checked record by record against the object's BTF
and the kernel's own counters; then a batch goes through a trace file.

Needs root (tests/kernel/conftest.py skips otherwise).
"""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest
from kernel_support import veth_pair
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from vnet.binding import BpfObject, RingBuffer, lib
from vnet.binding.ringbatch import HDR_SIZE, Batch, RingBatchReader, records
from vnet.collector.tracefile import (TraceFileReader, TraceFileWriter, decode_events, header_for_trace,
                                      stats_fields)
from vnet.errors import BpfError, UsageError
from vnet.objects import object_path
from vnet.probes.device import resolve
from vnet.trace import DeviceTrace
from vnet.trace.filters import PacketFilter
from vnet.trace.records import EventDecoder
from vnet.trace.session import SNAP_MAX

pytestmark = pytest.mark.kernel

PROG = "vnet_tc_ingress"
PROBE_ID = 0x77
PAGE = os.sysconf("SC_PAGE_SIZE")


def udp(ip_id: int = 1) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                 / IP(src="10.1.0.1", dst="10.1.0.2", id=ip_id) / UDP(sport=4000, dport=5000) / b"ringbatch")


def load(ring_bytes: int, wakeup_every: int = 64, snaplen: int = 0) -> BpfObject:
    obj = BpfObject(object_path("tc_trace"))
    try:
        obj.set_config("tc_cfg", {"probe_id": PROBE_ID, "wakeup_every": wakeup_every, "snaplen": snaplen})
        obj.keep_programs([PROG])
        obj.maps["vnet_events"].max_entries = ring_bytes
        obj.load()
    except BaseException:
        obj.close()
        raise
    return obj


@pytest.fixture
def small():
    """A 4-page ring: a few laps are quick to make."""
    with load(4 * PAGE) as obj:
        yield obj


def stats(obj: BpfObject) -> dict[str, int]:
    layout = obj.btf.struct("vnet_stats")
    rows = [layout.decode(v)["v"] for v in obj.maps["vnet_stats"].lookup(PROBE_ID.to_bytes(4, "little"))]
    return {name: sum(r[i] for r in rows) for name, i in obj.btf.enum("vnet_stat").items() if name != "VNET_STAT_MAX"}


@pytest.fixture
def small_snap():
    """The same, with snap records: packet records are two whole cache lines, which divide
    the ring, so none would straddle its end; a snap record (7 lines) does not divide it."""
    with load(4 * PAGE, snaplen=64) as obj:
        yield obj


def record_size(obj: BpfObject, snap: bool = False) -> int:
    size = obj.btf.struct("vnet_event_more").size + SNAP_MAX if snap else obj.btf.struct("vnet_event").size
    return HDR_SIZE + (size + 7) // 8 * 8


def ip_ids(obj: BpfObject, blob: bytes) -> list[int]:
    layout = obj.btf.struct("vnet_event")
    return [layout.decode(r)["ip_id"] for r in records(blob)]


def decoder(obj: BpfObject) -> EventDecoder:
    btf = obj.btf
    enums = {n: btf.enum(n) for n in ("vnet_hook", "vnet_event_flag", "vnet_event_kind")}
    hook = enums["vnet_hook"]["VNET_HOOK_TC_INGRESS"]
    return EventDecoder(btf.struct("vnet_event"), enums, {(PROBE_ID, hook): {"probe": "dev:test:ingress"}}, 0,
                        sched_layout=btf.struct("vnet_sched_event"))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# -- reading -----------------------------------------------------------------------------------------------

def test_a_batch_holds_every_committed_record_and_each_decodes():
    with load(1 << 20) as obj:
        reader = RingBatchReader(obj.maps["vnet_events"])
        frame = udp(ip_id=321)
        obj.programs[PROG].test_run(frame, repeat=100)
        batch = reader.read()
        assert (batch.count, batch.discarded) == (stats(obj)["VNET_STAT_EMITTED"], 0) == (100, 0)
        assert batch.nbytes == 100 * record_size(obj)
        events = [decoder(obj).decode(r) for r in records(batch.data)]
        assert len(events) == 100
        for ev in events:
            assert (ev["probe"], ev["proto"], ev["src"], ev["dst"], ev["sport"], ev["dport"], ev["ip_id"],
                    ev["len"]) == ("dev:test:ingress", "udp", "10.1.0.1", "10.1.0.2", 4000, 5000, 321, len(frame))
        assert len({ev["pkt_id"] for ev in events}) == 1
        assert [ev["ts_ns"] for ev in events] == sorted(ev["ts_ns"] for ev in events)
        assert reader.read() == Batch(b"", 0, 0) and reader.pending() == 0


def test_100k_events_in_one_batch_match_the_kernel_count():
    n = 100_000
    with load(16 << 20) as obj:
        reader = RingBatchReader(obj.maps["vnet_events"])
        obj.programs[PROG].test_run(udp(ip_id=9), repeat=n)
        st = stats(obj)
        assert st["VNET_STAT_LOST"] == 0
        batch = reader.read()
        assert batch.count == st["VNET_STAT_EMITTED"] == n and batch.nbytes == n * record_size(obj)
        layout = obj.btf.struct("vnet_event")
        unpack, names = layout.codec().unpack_from, layout.names
        pid, ipid, ts = names.index("probe_id"), names.index("ip_id"), names.index("ts_ns")
        last = 0
        for raw in records(batch.data):
            values = unpack(raw)
            assert values[pid] == PROBE_ID and values[ipid] == 9 and values[ts] >= last
            last = values[ts]


def test_records_that_wrap_around_the_ring_end_come_out_whole(small_snap):
    """Rounds of events with a distinct IP ID each, read between rounds, until
    the positions have gone around the 16 KiB ring many times."""
    obj = small_snap
    reader = RingBatchReader(obj.maps["vnet_events"])
    size, rec = reader.size, record_size(obj, snap=True)
    per_round = (size // rec) * 2 // 3
    straddled = 0
    for rnd in range(40):
        start = reader.position
        obj.programs[PROG].test_run(udp(ip_id=rnd), repeat=per_round)
        batch = reader.read()
        assert batch.count == per_round and ip_ids(obj, batch.data) == [rnd] * per_round, rnd
        assert reader.position == start + per_round * rec
        straddled += sum((start + i * rec) % size + rec > size for i in range(per_round))
    assert reader.position > 10 * size and straddled >= 10  # many laps, many records cut by the ring's end
    st = stats(obj)
    assert st["VNET_STAT_EMITTED"] == 40 * per_round and st["VNET_STAT_LOST"] == 0


def test_a_partially_consumed_ring_resumes_where_the_last_reader_stopped(small):
    """The consumer position lives in the kernel's page: readers (ours, libbpf's)
    take turns and each one continues exactly where the previous one stopped."""
    obj = small
    for i in range(50):
        obj.programs[PROG].test_run(udp(ip_id=i))
    first = RingBatchReader(obj.maps["vnet_events"])
    rec = record_size(obj)
    assert ip_ids(obj, first.read(max_records=20).data) == list(range(20))
    assert ip_ids(obj, first.read(max_bytes=10 * rec + rec // 2).data) == list(range(20, 30))
    second = RingBatchReader(obj.maps["vnet_events"])
    assert second.pending() == 20 * rec
    assert ip_ids(obj, second.read(max_records=5).data) == list(range(30, 35))
    layout = obj.btf.struct("vnet_event")
    assert [layout.decode(r)["ip_id"] for r in RingBuffer(obj.maps["vnet_events"]).drain()] == list(range(35, 50))
    assert first.read().count == 0 and second.pending() == 0


def test_a_peeked_batch_is_the_ring_itself_until_consumed(small_snap):
    """peek() gives what read() would, as a view of the ring, and the position moves
    only with consume(); the programs cannot write over a peeked batch: their events
    are lost instead. The data area is mapped once: a batch stops at its end, the
    record the end cuts comes alone as a copy, and the next batch starts at 0."""
    obj = small_snap
    reader = RingBatchReader(obj.maps["vnet_events"])
    rec = record_size(obj, snap=True)
    per_round = (reader.size // rec) * 2 // 3
    pieces_seen = set()
    for rnd in range(6):  # the start moves around the 16 KiB ring: some batches wrap
        start = reader.position
        obj.programs[PROG].test_run(udp(ip_id=rnd), repeat=per_round)
        got = 0
        while got < per_round:
            at = reader.position
            batch = reader.peek(max_records=per_round - got)
            off = at % reader.size
            cut = off + batch.nbytes > reader.size
            assert batch.count >= 1 and ip_ids(obj, batch.data) == [rnd] * batch.count
            assert isinstance(batch.data, bytes if cut else memoryview), (off, batch.nbytes)
            assert not cut or batch.count == 1  # only the record the end cuts is copied
            assert off + batch.nbytes <= reader.size or cut
            pieces_seen.add("cut" if cut else "end" if off + batch.nbytes == reader.size else "view")
            with pytest.raises(UsageError):
                reader.peek()  # one batch out at a time
            if got == 0:
                lost = stats(obj)["VNET_STAT_LOST"]
                obj.programs[PROG].test_run(udp(ip_id=99), repeat=per_round)  # no room but the rest of the ring
                assert stats(obj)["VNET_STAT_LOST"] > lost
                assert ip_ids(obj, batch.data) == [rnd] * batch.count  # untouched
                with pytest.raises(UsageError):
                    reader.consume(Batch(b"x" * 8, 1, 0))  # not the batch peeked
            assert reader.position == at
            reader.consume(batch)
            assert reader.position == at + batch.nbytes
            got += batch.count
        assert got == per_round and reader.position == start + per_round * rec
        reader.read()  # the 99s that fitted
    assert "cut" in pieces_seen  # the rounds did cross the ring's end
    assert reader.read() == Batch(b"", 0, 0) and reader.peek() == Batch(b"", 0, 0)


def test_a_full_ring_loses_at_the_tail_and_the_reader_gets_the_rest():
    with load(PAGE) as obj:
        reader = RingBatchReader(obj.maps["vnet_events"])
        for rnd in range(3):
            obj.programs[PROG].test_run(udp(ip_id=rnd), repeat=200)  # nobody reads meanwhile
            batch = reader.read()
            assert batch.count == (PAGE - 1) // record_size(obj) and ip_ids(obj, batch.data) == [rnd] * batch.count
        st = stats(obj)
        assert st["VNET_STAT_EMITTED"] == 3 * batch.count and st["VNET_STAT_EMITTED"] + st["VNET_STAT_LOST"] == 600


# -- waiting -----------------------------------------------------------------------------------------------

def test_wait_blocks_until_the_kernel_signals_data():
    with load(4 * PAGE, wakeup_every=1) as obj:
        reader = RingBatchReader(obj.maps["vnet_events"])
        t0 = time.monotonic()
        assert reader.wait(150) is False
        assert time.monotonic() - t0 >= 0.14

        timer = threading.Timer(0.3, lambda: obj.programs[PROG].test_run(udp(ip_id=5)))
        timer.start()
        t0 = time.monotonic()
        try:
            assert reader.wait(20_000) is True
        finally:
            timer.join()
        assert 0.25 < time.monotonic() - t0 < 10  # woken by the event, long before the timeout
        assert reader.wait(20_000) is True  # data pending: no waiting at all
        assert ip_ids(obj, reader.read().data) == [5]


# -- lifetimes ---------------------------------------------------------------------------------------------

def test_closing_the_object_unmaps_and_the_reader_refuses():
    fds = open_fds()
    obj = load(4 * PAGE)
    reader = RingBatchReader(obj.maps["vnet_events"])
    obj.programs[PROG].test_run(udp())
    obj.close()
    assert reader.closed and open_fds() == fds
    for call in (reader.read, reader.pending, lambda: reader.wait(0)):
        with pytest.raises(BpfError, match="closed"):
            call()
    reader.close()  # idempotent


def test_a_dropped_reader_releases_its_mapping_and_fds(small):
    fds = open_fds()
    reader = RingBatchReader(small.maps["vnet_events"])
    assert len(open_fds() - fds) == 4  # the two mappings' fds (mmap keeps a dup) and two epolls
    del reader
    gc.collect()
    assert open_fds() == fds
    reader = RingBatchReader(small.maps["vnet_events"])
    small.programs[PROG].test_run(udp(), repeat=3)
    assert reader.read().count == 3


def test_an_unclosed_object_with_a_reader_is_freed_by_gc():
    fds = open_fds()
    obj = load(4 * PAGE)
    reader = RingBatchReader(obj.maps["vnet_events"])
    del obj, reader
    gc.collect()
    assert open_fds() == fds


def test_only_a_ring_buffer_map_is_read(small):
    with pytest.raises(UsageError, match="not a ring buffer"):
        RingBatchReader(small.maps["vnet_stats"])


# -- into a trace file ---------------------------------------------------------------------------------------

def test_a_real_batch_written_to_a_trace_file_decodes_from_the_file_alone(tmp_path):
    """A DeviceTrace on a veth: its program test-run, the batch written with the
    header made from the trace, read back and decoded without the object."""
    only_ours = PacketFilter(proto="udp", dport=5000)  # the veth's own IPv6 chatter stays out
    with veth_pair(93) as net, DeviceTrace([resolve(net.spec1)], directions=("ingress",),
                                           packet_filter=only_ours, rings=1,  # test runs on any CPU
                                           areas=False) as trace:  # ... into the ring, not the CPU's area
        reader = RingBatchReader(trace.objects[0].maps["vnet_events"])
        obj = trace.objects[0]
        for i in range(30):
            obj.programs[PROG].test_run(udp(ip_id=i))
        batch = reader.read()
        assert batch.count == 30
        header = header_for_trace(trace, host="hv-test", trace_name="t93")
        path = tmp_path / "hv-test.vnt"
        with TraceFileWriter(path, header) as w:
            w.write("events", seq=0, records=batch.data, count=batch.count)
            w.write("stats", seq=1, **stats_fields(trace))
            st = trace.stats()
            w.write("end", seq=2, kernel={"emitted": st.emitted, "lost": st.lost})
        want = [trace.decoder.decode(r) for r in records(batch.data)]
        kind = trace.hooks[0].kind
    r = TraceFileReader(path)
    assert r.header["host"] == "hv-test" and r.header["kernel"] == os.uname().release
    assert r.header["probes"] == [{"probe": f"dev:{net.spec1}:ingress", "hook": kind}]
    (chunk,) = r.chunks(["events"])
    got = decode_events(r.header, chunk["records"])
    assert got == want == list(r.events())
    assert [e["ip_id"] for e in got] == list(range(30))
    assert {e["probe"] for e in got} == {f"dev:{net.spec1}:ingress"} and got[0]["netns"] == net.ns1
    assert next(iter(r.chunks(["end"])))["kernel"] == {"emitted": 30, "lost": 0}
    per_cpu = next(iter(r.chunks(["stats"])))["per_cpu"]
    assert set(per_cpu) == {"seen", "emitted", "lost", "filtered"}
    assert len(per_cpu["seen"]) == lib().libbpf_num_possible_cpus()
    assert sum(per_cpu["emitted"]) == 30 and sum(per_cpu["lost"]) == 0
    assert r.header["filter"] == {"proto": "udp", "dport": 5000}
