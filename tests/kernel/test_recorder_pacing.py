"""`vnet trace -w`'s recorder under a steady flow: by default it lets events gather in the
ring between writes (up to 1 MiB, at most 100 ms after its last write), so a flow is written
in a few large chunks, not one small chunk per wakeup; --immediate-mode writes each batch as
soon as it is read. The flow is the real tc program run by BPF_PROG_TEST_RUN from a thread,
bursts of BURST records every ~2 ms for FLOW_S; every event must reach the file either way.
What is asserted are counts the pacing logic bounds, not times."""

from __future__ import annotations

import threading
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from vnet.collector.tracefile import TraceFileReader
from vnet.trace.recorder import GATHER_BYTES, GATHER_DELAY_MS, record
from vnet.trace.session import Plan, Trace

pytestmark = pytest.mark.kernel

PROG = "vnet_tc_ingress"
FRAME = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
              / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=4000, dport=5000) / b"paced")
BURST, FLOW_S = 50, 1.0


def flow_into(path, immediate: bool) -> tuple[int, int, float]:
    """(events written, chunks, seconds the recorder ran) for one steady flow."""
    plan = Plan("tc_trace", "tc_cfg", {"l3": 0}, (PROG,), lambda _obj: [], {}, name="dev:test", filterable=True)
    with Trace([plan], ring_bytes=8 << 20) as t:
        t.start()
        done = threading.Event()

        def produce() -> None:
            end = time.monotonic() + FLOW_S
            while time.monotonic() < end:
                t.objects[0].programs[PROG].test_run(FRAME, repeat=BURST)
                time.sleep(0.002)
            done.set()

        producer = threading.Thread(target=produce)
        started = time.monotonic()
        producer.start()
        try:
            out = record(t, path, ending=done.is_set, count=None, immediate=immediate)
        finally:
            producer.join()
        ran = time.monotonic() - started
        stats = t.stats()
    assert stats.lost == 0
    assert out.events == stats.emitted
    assert sum(c["count"] for c in TraceFileReader(path).chunks(["events"])) == stats.emitted
    return out.events, out.chunks, ran


def test_a_steady_flow_is_written_in_few_chunks_and_immediate_mode_writes_as_it_reads(tmp_path):
    paced = tmp_path / "paced.vnt"
    events, chunks, ran = flow_into(paced, immediate=False)
    # each write but the first and the last waits GATHER_DELAY_MS after the one before: GATHER_BYTES
    # would end the wait sooner, but this flow brings less in that time (the file's bytes per event
    # bound a record's)
    assert paced.stat().st_size / ran * GATHER_DELAY_MS / 1000 < GATHER_BYTES
    assert chunks <= ran * 1000 / GATHER_DELAY_MS + 3, (chunks, ran)
    events_i, chunks_i, ran_i = flow_into(tmp_path / "immediate.vnt", immediate=True)
    # at the latest its 20 ms timer finds data: about ran_i / 0.02 chunks, and more on wakeups
    assert chunks_i >= 3 * (ran * 1000 / GATHER_DELAY_MS + 3), (chunks_i, ran_i, chunks)
