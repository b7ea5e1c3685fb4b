"""A regression guard that is not a timing: the production drain paths make no
Python call per event.

The ring is filled by the real tc program (BPF_PROG_TEST_RUN with a repeat
count, nobody reading meanwhile), loaded by vnet's trace loader; then one drain
runs under sys.setprofile, which sees every call in this thread:

  python calls  'call' events: Python functions entered, generator resumes included
  C calls       'c_call' events: builtins and methods implemented in C (len, bytes, ...)

Drained: `vnet trace -w`'s recorder (vnet.trace.recorder.record: ring batches
into a trace file) and the agent's drain (AgentTrace._ship_available: ring
batches to the real Shipper's queue). With N = 1,000 and N = 20,000 events the
counts must be equal or nearly: growth below (20,000 - 1,000) / 100 calls.
A same-size run of records is taken in blocks that double (ringbatch.walk), so
C calls may grow with log N, never with N. As a control, libbpf's per-record
callback (RingBuffer.drain, the `vnet trace` live printer's reader) is counted
the same way and must show at least one Python call per event.

Needs root (tests/kernel/conftest.py).
"""

from __future__ import annotations

import collections
import dataclasses
import socket
import sys
import types

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from vnet.agent.agent import AgentTrace
from vnet.agent.shipper import Shipper
from vnet.binding import RingBuffer
from vnet.collector.tracefile import TraceFileReader
from vnet.trace.recorder import record
from vnet.trace.session import Plan, Trace

pytestmark = pytest.mark.kernel

PROG = "vnet_tc_ingress"
SMALL, LARGE = 1_000, 20_000
MAX_GROWTH = (LARGE - SMALL) // 100
FRAME = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
              / IP(src="10.1.0.1", dst="10.1.0.2", id=7) / UDP(sport=4000, dport=5000) / b"per-event")


@dataclasses.dataclass(frozen=True)
class Calls:
    python: int
    c: int


def counted(fn) -> tuple[object, Calls]:
    """fn()'s result and the calls made in this thread while it ran."""
    seen: collections.Counter = collections.Counter()

    def profile(_frame, event, _arg):
        seen[event] += 1

    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, Calls(seen["call"], seen["c_call"])


@pytest.fixture(scope="module")
def trace():
    """A started Trace of the tc program, attached nowhere: its CPU's event area is filled by test runs."""
    plan = Plan("tc_trace", "tc_cfg", {"l3": 0}, (PROG,), lambda _obj: [], {}, name="dev:test", filterable=True)
    t = Trace([plan], ring_bytes=8 << 20)
    t.start()
    try:
        yield t
    finally:
        t.close()


def fill(trace: Trace, n: int) -> None:
    before = trace.stats()
    trace.objects[0].programs[PROG].test_run(FRAME, repeat=n)
    after = trace.stats()
    assert (after.emitted - before.emitted, after.lost - before.lost) == (n, 0)


def assert_flat(name: str, small: Calls, large: Calls) -> None:
    growth = Calls(large.python - small.python, large.c - small.c)
    assert growth.python <= MAX_GROWTH and growth.c <= MAX_GROWTH, (
        f"{name}: {SMALL} events: {small}; {LARGE} events: {large}: the drain makes calls per event "
        f"(growth {growth}, allowed {MAX_GROWTH})")


def test_recorder_drain_makes_no_python_call_per_event(trace, tmp_path):
    def drain_into(path, n: int) -> Calls:
        fill(trace, n)
        polls = iter((False,))  # one wait + batch loop, then the final drain, as a -w run that is stopped
        out, calls = counted(lambda: record(trace, path, ending=lambda: next(polls, True), count=None))
        assert out.events == n
        got = sum(c["count"] for c in TraceFileReader(path).chunks(["events"]))
        assert got == n
        return calls

    drain_into(tmp_path / "warm.vnt", 10)  # first-time imports and caches
    small = min((drain_into(tmp_path / f"s{i}.vnt", SMALL) for i in range(2)), key=lambda c: (c.python, c.c))
    large = min((drain_into(tmp_path / f"l{i}.vnt", LARGE) for i in range(2)), key=lambda c: (c.python, c.c))
    assert_flat("vnet trace -w (recorder.record)", small, large)


def test_agent_drain_makes_no_python_call_per_event(trace, tmp_path):
    # The agent's own method on the real reader and the real Shipper. Its collector
    # is a bound port nobody listens on: chunks stay queued in memory (the sender
    # thread retrying meanwhile is not profiled: sys.setprofile is per thread).
    closed_port = socket.socket()
    closed_port.bind(("127.0.0.1", 0))
    shipper = Shipper(f"127.0.0.1:{closed_port.getsockname()[1]}", b"k" * 32,
                      {"trace": "t", "host": "h", "header": {}}, spool_dir=tmp_path / "spool")
    agent = types.SimpleNamespace(reader=trace.batch_reader(),
                                  shipper=shipper, events=0, chunks=0)
    try:
        def drain(n: int) -> Calls:
            fill(trace, n)
            before = agent.events
            _, calls = counted(lambda: AgentTrace._ship_available(agent))
            assert agent.events - before == n
            return calls

        drain(10)
        small = min((drain(SMALL) for _ in range(2)), key=lambda c: (c.python, c.c))
        large = min((drain(LARGE) for _ in range(2)), key=lambda c: (c.python, c.c))
    finally:
        agent.reader.close()
        shipper.close()
        closed_port.close()
    assert_flat("agent (AgentTrace._ship_available)", small, large)


def test_the_count_sees_a_per_event_callback():
    """Control: libbpf's ring_buffer__consume calls back into Python per record (events in the
    rings alone: libbpf reads no event area)."""
    plan = Plan("tc_trace", "tc_cfg", {"l3": 0}, (PROG,), lambda _obj: [], {}, name="dev:test", filterable=True)
    with Trace([plan], ring_bytes=8 << 20, areas=False) as trace:
        ring = RingBuffer(*trace.rings)
        fill(trace, SMALL)
        raw, calls = counted(ring.drain)
    assert len(raw) == SMALL
    assert calls.python >= SMALL, calls
