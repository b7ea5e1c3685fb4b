"""One event ring per CPU (vnet_rings, bpf/src/vnet_common.bpf.h): each CPU's programs write
to the ring user space gave that CPU, every reader reads them all, and nothing is lost
or out of order on the way. Packets are sent from threads pinned to one CPU each: a
veth's egress hook runs on the sender's CPU, so which ring an event is in is known.

Needs root and two CPUs (tests/kernel/conftest.py)."""

from __future__ import annotations

import os

import pytest
from kernel_support import send_from_cpu, veth_pair

from vnet.binding.ringbatch import RingBatchReader, records
from vnet.collector.tracefile import TraceFileReader, decode_events
from vnet.probes.device import resolve
from vnet.trace import DeviceTrace
from vnet.trace.filters import PacketFilter
from vnet.trace.recorder import record
from vnet.trace.session import DEFAULT_RINGS

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to run on")]

PORT = 5077
ONLY_OURS = PacketFilter(proto="udp", dport=PORT)  # the veth's own IPv6 chatter stays out
CPUS = sorted(os.sched_getaffinity(0))[:2]


@pytest.fixture(scope="module")
def net():
    with veth_pair(94) as pair:
        yield pair


def send_from(net, cpu: int, count: int, sport: int = 4000) -> None:
    send_from_cpu(net, cpu, PORT, count, sport)


def egress(net, **kw) -> DeviceTrace:
    """The rings alone: every event in them (the CPUs' event areas: test_areas.py)."""
    return DeviceTrace([resolve(net.spec1)], directions=("egress",), packet_filter=ONLY_OURS, areas=False, **kw)


@pytest.mark.parametrize("snaplen", [0, 64], ids=["event", "event+bytes"])
def test_each_cpu_writes_its_events_to_its_own_ring(net, snaplen):
    """Two rings of 8 MiB each: CPU i's events in ring i, all of them, none lost.
    With --snaplen the event and the packet's bytes are one reservation (vnet_emit_snap)."""
    with egress(net, rings=2, snaplen=snaplen) as trace:
        assert len(trace.rings) == 2
        assert [r.max_entries for r in trace.rings] == [8 << 20, 8 << 20]
        assert trace.rings_ready.wait(10)  # set after start, not to delay the first event
        sent = dict(zip(CPUS, (40, 60)))
        for cpu, n in sent.items():
            send_from(net, cpu, n)
        got = [[trace.decoder.decode(r) for r in records(RingBatchReader(ring).read().data)] for ring in trace.rings]
        st = trace.stats()
    by_ring = {i: sorted({e["cpu"] for e in events}) for i, events in enumerate(got)}
    assert by_ring == {CPUS[0] % 2: [CPUS[0]], CPUS[1] % 2: [CPUS[1]]}, by_ring
    assert sorted(len(events) for events in got) == [40, 60]
    assert (st.emitted, st.lost) == (100, 0)
    if snaplen:
        assert all(len(e["packet"]) == 2 * e["len"] for events in got for e in events)  # whole: < 64 bytes


def test_one_ring_when_asked_holds_every_cpus_events(net):
    """--rings 1: one ring for all; no CPU has a ring of its own (an empty vnet_rings slot
    means vnet_events)."""
    with egress(net, rings=1) as trace:
        assert len(trace.rings) == 1 and trace.rings[0].max_entries == 8 << 20
        assert trace.objects[0].maps["vnet_rings"].max_entries == 1
        for cpu in CPUS:
            send_from(net, cpu, 25)
        events = [trace.decoder.decode(r) for r in records(RingBatchReader(trace.rings[0]).read().data)]
    assert sorted({e["cpu"] for e in events}) == CPUS and len(events) == 50


def test_by_default_each_cpu_has_a_ring_of_the_ring_size(net):
    with egress(net, ring_bytes=1 << 20) as trace:
        assert len(trace.rings) == min(os.cpu_count(), DEFAULT_RINGS)
        assert all(r.max_entries == 1 << 20 for r in trace.rings)


def test_the_printer_gives_both_rings_events_in_time_order(net):
    """The live printer's reader (libbpf, every ring) returns each ring's records after the
    other's; Trace.poll puts them back in time order. Packets sent one at a time, from the
    two CPUs in turn, each with its own source port: the order of the ports is the order
    they were sent in."""
    with egress(net, rings=2) as trace:
        assert trace.rings_ready.wait(10)
        for i in range(20):
            send_from(net, CPUS[i % 2], 1, sport=6000 + i)
        events = trace.poll(100) + trace.drain()
    assert [e["sport"] for e in events] == list(range(6000, 6020))
    assert {e["cpu"] for e in events} == set(CPUS)


def test_the_recorder_writes_every_rings_events(net, tmp_path):
    """`vnet trace -w`: a chunk per ring with events each round, all of them in the file."""
    path = tmp_path / "rings.vnt"
    with egress(net, rings=2) as trace:
        assert trace.rings_ready.wait(10)
        for cpu in CPUS:
            send_from(net, cpu, 30)
        rounds = iter((False,))
        out = record(trace, path, ending=lambda: next(rounds, True), count=None)
        st = trace.stats()
    assert out.events == st.emitted == 60 and st.lost == 0
    chunks = list(TraceFileReader(path).chunks(["events"]))
    assert len(chunks) == 2  # one from each ring
    reader = TraceFileReader(path)
    events = [e for c in reader.chunks(["events"]) for e in decode_events(reader.header, c["records"])]
    assert sorted({e["cpu"] for e in events}) == CPUS and len(events) == 60


def test_until_the_cpus_have_their_rings_every_event_is_in_the_first(net):
    """The slots are set in a thread after start (a map-of-maps update waits ~8 ms for RCU):
    what comes before is in vnet_events, read as any ring's. Here the thread is held back."""
    import threading

    from vnet.binding.object import Map

    hold, real = threading.Event(), Map.update_batch

    def held(self, keys, values):
        hold.wait(10)
        real(self, keys, values)

    Map.update_batch = held
    try:
        with egress(net, rings=2) as trace:
            for cpu in CPUS:
                send_from(net, cpu, 10)
            assert not trace.rings_ready.is_set()
            first = [trace.decoder.decode(r) for r in records(RingBatchReader(trace.rings[0]).read().data)]
            hold.set()
            assert trace.rings_ready.wait(10)
            for cpu in CPUS:
                send_from(net, cpu, 10)
            later = [[trace.decoder.decode(r) for r in records(RingBatchReader(ring).read().data)]
                     for ring in trace.rings]
    finally:
        Map.update_batch = real
        hold.set()
    assert sorted({e["cpu"] for e in first}) == CPUS and len(first) == 20
    assert sorted(len(events) for events in later) == [10, 10]
