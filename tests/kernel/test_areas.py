"""Per-CPU event areas (vnet_areas, bpf/src/vnet_common.bpf.h vnet_area_emit; the reader in
vnet/binding/cpuarea.py): each CPU's packet events go to an area only it writes, in the ring's
framing, and every reader (printer, recorder, agent) reads the areas with the rings. Nothing
is lost or reordered on the way; a full area loses at its tail, counted; a program that finds
the area busy (one it interrupted is writing) uses the ring. Packets are sent from threads
pinned to one CPU each: a veth's egress hook runs on the sender's CPU.

Needs root and two CPUs (tests/kernel/conftest.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from kernel_support import send_from_cpu, veth_pair

from vnet.binding.cpuarea import online_cpus
from vnet.binding.ringbatch import RingBatchReader, records
from vnet.collector.tracefile import TraceFileReader, decode_events
from vnet.probes import catalog
from vnet.probes import resolve as resolver
from vnet.probes.device import resolve
from vnet.trace import DeviceTrace
from vnet.trace.filters import PacketFilter
from vnet.trace.recorder import record
from vnet.trace.session import Trace, area_chunks

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to run on")]

PORT = 5078
ONLY_OURS = PacketFilter(proto="udp", dport=PORT)  # the veth's own IPv6 chatter stays out
CPUS = sorted(os.sched_getaffinity(0))[:2]
CHUNK = 1 << 20


@pytest.fixture(scope="module")
def net():
    with veth_pair(95) as pair:
        yield pair


def send_from(net, cpu: int, count: int, sport: int = 4000) -> None:
    send_from_cpu(net, cpu, PORT, count, sport)


def egress(net, **kw) -> DeviceTrace:
    return DeviceTrace([resolve(net.spec1)], directions=("egress",), packet_filter=ONLY_OURS, **kw)


def ring_records(trace) -> list:
    """Every record the kernel rings hold (the doorbells are discarded ones: skipped)."""
    return [r for ring in trace.rings for r in records(RingBatchReader(ring).read().data)]


def area_of(trace, cpu: int):
    return next(a for a in trace.areas if a.cpu == cpu)


def area_events(trace, reader) -> list[dict]:
    return [trace.decoder.decode(r) for r in records(reader.read().data)]


def test_each_cpu_writes_its_events_to_its_own_area(net):
    """Each CPU's area has that CPU's events, all of them in the order sent; the rings none
    (only the doorbells that woke the reader, which are discarded records)."""
    with egress(net) as trace:
        assert trace.area_chunks == area_chunks(8 << 20, len(trace.rings), len(online_cpus()), CHUNK) > 0
        assert [a.cpu for a in trace.areas] == online_cpus()
        sent = dict(zip(CPUS, (40, 60)))
        for cpu, n in sent.items():
            send_from(net, cpu, n, sport=4000 + cpu)
        in_rings = ring_records(trace)
        got = {cpu: area_events(trace, area_of(trace, cpu)) for cpu in CPUS}
        st = trace.stats()
    assert in_rings == []
    for cpu, n in sent.items():
        assert [e["cpu"] for e in got[cpu]] == [cpu] * n
        assert {e["sport"] for e in got[cpu]} == {4000 + cpu}
        stamps = [e["ts_ns"] for e in got[cpu]]
        assert stamps == sorted(stamps)
    assert (st.emitted, st.lost) == (100, 0)


def test_the_printer_and_the_recorder_read_the_areas(net, tmp_path):
    """Trace.poll (the live printer) gives the areas' events in time order with the rings';
    the recorder writes them to the file as any ring's."""
    with egress(net) as trace:
        for i in range(20):
            send_from(net, CPUS[i % 2], 1, sport=6000 + i)
        events = trace.poll(100) + trace.drain()
    assert [e["sport"] for e in events] == list(range(6000, 6020))
    path = tmp_path / "areas.vnt"
    with egress(net) as trace:
        for cpu in CPUS:
            send_from(net, cpu, 30)
        rounds = iter((False,))
        out = record(trace, path, ending=lambda: next(rounds, True), count=None)
        st = trace.stats()
    assert out.events == st.emitted == 60 and st.lost == 0
    reader = TraceFileReader(path)
    events = [e for c in reader.chunks(["events"]) for e in decode_events(reader.header, c["records"])]
    assert sorted({e["cpu"] for e in events}) == CPUS and len(events) == 60


def test_a_full_area_loses_at_the_tail_counted_and_the_reader_gets_the_rest(net):
    """One chunk a CPU (rings of 1 MiB): 1 MiB holds 8192 records of 128 bytes. Nobody reads
    while 9000 packets pass: the first 8192 are in the area, the rest counted lost."""
    with egress(net, ring_bytes=CHUNK, rings=2) as trace:
        if trace.area_chunks != 1:
            pytest.skip("one chunk a CPU needs two CPUs")
        send_from(net, CPUS[0], 9000)
        st = trace.stats()
        events = area_events(trace, area_of(trace, CPUS[0]))
    assert (st.emitted, st.lost) == (CHUNK // 128, 9000 - CHUNK // 128)
    assert len(events) == st.emitted
    assert [e["ip_id"] for e in events] == sorted(e["ip_id"] for e in events)  # the first ones, in order


def test_records_of_two_sizes_wrap_around_the_area_whole(net):
    """A record never crosses a chunk's end: what is left of a chunk becomes a discarded
    record. Drops (192 bytes in the area) and device events (128) through one chunk, read
    while they come, several times round: every one arrives whole, in order."""
    res = resolver.resolve(catalog.BY_NAME["drop:kfree_skb"])
    assert res.available, res.reason
    plans = [resolver.plan(res), *egress(net).plans]
    trace = Trace(plans, ring_bytes=CHUNK, rings=2, packet_filter=ONLY_OURS)
    with trace:
        if trace.area_chunks != 1:
            pytest.skip("one chunk a CPU needs two CPUs")
        area = area_of(trace, CPUS[0])
        got, discarded = [], 0
        for _ in range(6):
            send_from(net, CPUS[0], 2000)  # no one listens in ns2: each datagram is dropped there too
            batch = area.read()
            discarded += batch.discarded
            got += [trace.decoder.decode(r) for r in records(batch.data)]
        st = trace.stats()
        read = area.position
    assert st.lost == 0 and len(got) == st.emitted
    assert discarded >= 2  # (2000 * 128 + drops * 192) bytes a round: past the chunk's end more than once
    assert read > 2 * CHUNK
    drops = [e for e in got if e.get("reason") is not None]
    assert drops and len(drops) < len(got)
    stamps = [e["ts_ns"] for e in got]
    assert stamps == sorted(stamps)


def test_a_program_that_finds_the_area_busy_uses_the_ring(net):
    """A program that interrupted another one of its CPU that is writing the area (busy)
    writes its event to the ring instead. Marked busy by hand here: every event then goes to
    the CPU's ring, none to its area, none lost."""
    with egress(net, rings=2) as trace:
        assert trace.rings_ready.wait(10)
        area = area_of(trace, CPUS[0])
        layout = trace.btf.struct("vnet_area_pos")
        busy = (CPUS[0] * area._m.pos_stride + layout.field("busy").offset) // 8
        area._m.positions[busy] = trace.btf.enum("vnet_area")["VNET_AREA_BUSY"]
        send_from(net, CPUS[0], 25)
        area._m.positions[busy] = 0
        in_rings = [trace.decoder.decode(r) for r in ring_records(trace)]
        st = trace.stats()
        assert area.pending() == 0
    assert len(in_rings) == 25 and {e["cpu"] for e in in_rings} == {CPUS[0]}
    assert (st.emitted, st.lost) == (25, 0)


def test_a_waiting_reader_is_woken_by_the_first_event(net):
    """The reader waits on the rings; an event in an area rings a doorbell there (a discarded
    record with a forced wakeup) when the reader had read everything: a trace's first event
    reaches a waiting reader without its timer."""
    with egress(net) as trace:
        group = trace.batch_reader()
        assert not group.wait(0)
        t0 = time.monotonic()
        sender = threading.Timer(0.3, send_from, (net, CPUS[0], 1))
        sender.start()
        assert group.wait(30_000)
        waited = time.monotonic() - t0
        sender.join()
        batches = list(group.batches(100))
    assert waited < 15  # woken, not timed out (30 s)
    assert [b.count for _, _, b in batches] == [1]


def test_a_gathering_reader_is_woken_as_an_areas_fill_crosses_the_mark(net):
    """The pacing readers' wait (gather) ends at the doorbell the programs ring as the unread
    bytes of an area cross the wakeup mark (a quarter of a 1 MiB area: 2048 records), long
    before its timeout; a sleep would not hear it."""
    with egress(net, ring_bytes=CHUNK, rings=2) as trace:
        if trace.area_chunks != 1:
            pytest.skip("one chunk a CPU needs two CPUs")
        group = trace.batch_reader()
        send_from(net, CPUS[0], 1)  # data there from the start: no doorbell for a reader that waits idle
        mark = trace.wakeup["wakeup_bytes"]
        burst = threading.Timer(0.2, send_from, (net, CPUS[0], 2300))
        burst.start()
        try:
            t0 = time.monotonic()
            pending = group.gather(mark, 30_000)
            waited = time.monotonic() - t0
        finally:
            burst.join()
    assert pending >= mark
    assert waited < 15  # woken, not timed out (30 s)


def test_areas_off_when_asked_leave_every_event_in_the_rings(net):
    with egress(net, areas=False) as trace:
        assert trace.area_chunks == 0 and trace.areas == []
        assert trace.objects[0].maps["vnet_areas"].max_entries == 1
        send_from(net, CPUS[0], 10)
        assert len(ring_records(trace)) == 10
