"""`vnet trace -w`'s recorder under a steady flow. Gathering, it lets events come in the ring
between writes (up to 1 MiB, at most 100 ms after its last batch), so a flow is written in a
few large chunks, not one small chunk per wakeup; immediate, it writes each batch as soon as
it is read (--immediate-mode); auto, the default, gathers only while the machine's CPUs are
busy. The flow is the real tc program run by BPF_PROG_TEST_RUN from a thread, bursts of
BURST records every ~2 ms for FLOW_S; every event must reach the file in every mode. What is
asserted are counts the pacing logic bounds, not times."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from vnet.collector.tracefile import TraceFileReader
from vnet.trace.recorder import GATHER_BELOW_IDLE, GATHER_BYTES, GATHER_DELAY_MS, IdleCpus, record
from vnet.trace.session import Plan, Trace

pytestmark = pytest.mark.kernel

PROG = "vnet_tc_ingress"
FRAME = bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
              / IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=4000, dport=5000) / b"paced")
BURST, FLOW_S = 50, 1.0
SPIN = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"


def flow_into(path, mode: str, seconds: float = FLOW_S) -> tuple[int, int, float, int]:
    """(events written, chunks, seconds the recorder ran, rings) for one steady flow."""
    plan = Plan("tc_trace", "tc_cfg", {"l3": 0}, (PROG,), lambda _obj: [], {}, name="dev:test", filterable=True)
    with Trace([plan], ring_bytes=8 << 20) as t:
        t.start()
        done = threading.Event()

        def produce() -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t.objects[0].programs[PROG].test_run(FRAME, repeat=BURST)
                time.sleep(0.002)
            done.set()

        producer = threading.Thread(target=produce)
        started = time.monotonic()
        producer.start()
        try:
            out = record(t, path, ending=done.is_set, count=None, mode=mode)
        finally:
            producer.join()
        ran = time.monotonic() - started
        stats = t.stats()
        rings = len(t.rings)
    assert stats.lost == 0
    assert out.events == stats.emitted
    assert sum(c["count"] for c in TraceFileReader(path).chunks(["events"])) == stats.emitted
    return out.events, out.chunks, ran, rings


def gathered_bound(path, ran: float, rings: int) -> float:
    """Chunks a gathering recorder writes at most: each round of writes (a chunk from each ring
    the producer's thread wrote to) but the first and the last waits GATHER_DELAY_MS after the
    round before. GATHER_BYTES would end the wait sooner, but this flow brings less in that
    time (the file's bytes per event bound a record's)."""
    assert path.stat().st_size / ran * GATHER_DELAY_MS / 1000 < GATHER_BYTES
    return (ran * 1000 / GATHER_DELAY_MS + 3) * rings


@contextmanager
def busy_cpus():
    """Every CPU busy with a spinner at idle priority: the machine has no idle time, and the
    spinners give way to anything else (the flow, the recorder)."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN], preexec_fn=lambda: os.sched_setscheduler(
        0, os.SCHED_IDLE, os.sched_param(0))) for _ in range(os.cpu_count() or 1)]
    try:
        idle = IdleCpus()
        time.sleep(0.3)
        assert idle.update() < GATHER_BELOW_IDLE  # the gauge sees them as busy: auto gathers
        yield
    finally:
        for s in spinners:
            s.kill()
            s.wait()


def test_gathering_writes_a_steady_flow_in_few_chunks_and_immediate_mode_as_it_reads(tmp_path):
    events, chunks, ran, rings = flow_into(tmp_path / "gather.vnt", "gather")
    assert chunks <= gathered_bound(tmp_path / "gather.vnt", ran, rings), (chunks, ran)
    events_i, chunks_i, ran_i, _ = flow_into(tmp_path / "immediate.vnt", "immediate")
    # at the latest its 20 ms timer finds data: about ran_i / 0.02 chunks, and more on wakeups
    assert chunks_i >= 3 * gathered_bound(tmp_path / "gather.vnt", ran, 1), (chunks_i, ran_i, chunks)


def test_auto_gathers_while_the_cpus_are_busy_and_drains_at_once_while_idle(tmp_path):
    """Its first IDLE_SAMPLE_S (no sample yet) is drained at once either way; the rest of a
    3 s flow brings ~30 chunks gathering and ~200 draining at once."""
    with busy_cpus():
        _, busy, _, _ = flow_into(tmp_path / "busy.vnt", "auto", seconds=3.0)
    _, idle, _, _ = flow_into(tmp_path / "idle.vnt", "auto", seconds=3.0)
    assert busy * 2 <= idle, (busy, idle)
