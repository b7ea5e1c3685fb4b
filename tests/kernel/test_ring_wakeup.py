"""The programs' wakeup policy (vnet_wakeup_flags in bpf/src), watched from an epoll on the
real ring while the tc program runs by BPF_PROG_TEST_RUN: no wakeup for most records; at
every `wakeup_every`-th record per CPU a forced one as the unread data passes `wakeup_bytes`
(once: not at every later check while the reader lags), else the kernel's adaptive one, which
wakes only a reader that has read everything (a trace's first event). The epoll is
edge-triggered: it reports a wakeup of the ring, not data that is there. What is asserted is
whether the kernel woke the reader at all, not how soon: the waits are bounds, never measured."""

from __future__ import annotations

import os
import select
import struct
import threading
import time
from contextlib import contextmanager

import pytest

from vnet.binding import BpfObject
from vnet.binding.ringbatch import HDR_SIZE, RingBatchReader
from vnet.objects import object_path
from vnet.trace.session import Plan, Trace, wakeup_config

pytestmark = pytest.mark.kernel

PROG = "vnet_tc_ingress"
RING = 64 * os.sysconf("SC_PAGE_SIZE")
EVERY = 64
SIGNALLED_S = 10.0  # a signal the kernel queued arrives long before this (an irq_work)
QUIET_S = 0.5       # when none was queued, nothing comes in this long either

FRAME = (b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
         + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 36, 1, 0x4000, 64, 17, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
         + struct.pack("!HHHH", 4000, 5000, 16, 0) + b"wakeup-pol")


@contextmanager
def one_cpu():
    """The policy counts records per CPU: keep every test run on one."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def loaded(**wakeup):
    obj = BpfObject(object_path("tc_trace"))
    try:
        obj.set_config("tc_cfg", {"probe_id": 0, **wakeup})
        obj.keep_programs([PROG])
        obj.maps["vnet_events"].max_entries = RING
        obj.load()
        ep = select.epoll()
        ep.register(obj.maps["vnet_events"].fd, select.EPOLLIN | select.EPOLLET)
        with one_cpu():
            yield obj, ep
        ep.close()
    finally:
        obj.close()


def produce(obj: BpfObject, n: int) -> None:
    obj.programs[PROG].test_run(FRAME, repeat=n)


def signalled(ep, timeout: float) -> bool:
    return bool(ep.poll(timeout))


def read_all(obj: BpfObject, ep, reader: RingBatchReader) -> None:
    while reader.read().count:
        pass


def record_bytes(obj: BpfObject) -> int:
    return HDR_SIZE + (obj.btf.struct("vnet_event").size + 7) // 8 * 8


def test_below_the_fill_level_only_an_idle_reader_is_woken():
    with loaded(**wakeup_config(RING, EVERY)) as (obj, ep):
        reader = RingBatchReader(obj.maps["vnet_events"])
        produce(obj, 1)  # the first record is a check; the reader has read everything: adaptive wakeup
        assert signalled(ep, SIGNALLED_S)
        read_all(obj, ep, reader)
        produce(obj, EVERY)  # records 1..63 without a wakeup, 64 a check with unread data before it
        assert not signalled(ep, QUIET_S)
        assert reader.read().count == EVERY


def test_a_wakeup_is_forced_at_the_first_check_past_the_fill_level():
    with loaded(**wakeup_config(RING, EVERY)) as (obj, ep):
        reader = RingBatchReader(obj.maps["vnet_events"])
        threshold = RING // 4
        produce(obj, 1)
        assert signalled(ep, SIGNALLED_S)
        read_all(obj, ep, reader)
        rec = record_bytes(obj)
        # record k (1, 2, ... after the first) finds k - 1 records unread; checks are at multiples of EVERY
        first_forced = next(k for k in range(EVERY, 10 * RING // rec, EVERY) if (k - 1) * rec >= threshold)
        assert first_forced * rec < RING  # the test's ring has room for all of them
        produce(obj, first_forced - 1)  # up to just before the check that must force
        assert not signalled(ep, QUIET_S)
        produce(obj, 1)
        assert signalled(ep, SIGNALLED_S)
        produce(obj, 2 * EVERY)  # the next checks find the mark passed by more than EVERY records: no more
        assert not signalled(ep, QUIET_S)
        assert reader.read().count == first_forced + 2 * EVERY


def test_wakeup_bytes_zero_forces_at_every_check():
    with loaded(wakeup_every=EVERY, wakeup_bytes=0) as (obj, ep):
        reader = RingBatchReader(obj.maps["vnet_events"])
        produce(obj, 1)
        assert signalled(ep, SIGNALLED_S)
        read_all(obj, ep, reader)
        produce(obj, EVERY - 1)
        assert not signalled(ep, QUIET_S)
        produce(obj, 1)  # record 64: a check, forced although almost nothing is unread
        assert signalled(ep, SIGNALLED_S)


def test_trace_configures_every_program_with_the_policy():
    plan = Plan("tc_trace", "tc_cfg", {"l3": 0}, (PROG,), lambda _obj: [], {}, name="dev:w", filterable=True)
    with Trace([plan], ring_bytes=1 << 20) as t:
        cfg = t.objects[0].config("tc_cfg")
    assert (cfg["wakeup_every"], cfg["wakeup_bytes"]) == (64, (1 << 20) // 4)


def test_gather_waits_through_data_already_there_and_a_wakeup_already_had():
    """RingBatchReader.gather, the pacing readers' wait: pending data does not end it (as it
    ends wait()), nor does a wakeup that came before it was called (the first record's)."""
    with loaded(**wakeup_config(RING, EVERY)) as (obj, _ep):
        reader = RingBatchReader(obj.maps["vnet_events"])
        produce(obj, 1)  # into an empty ring: the adaptive wakeup, before the call
        started = time.monotonic()
        assert reader.gather(RING // 4, QUIET_S * 1000) == record_bytes(obj)
        assert time.monotonic() - started >= QUIET_S
        assert reader.gather(record_bytes(obj), SIGNALLED_S * 1000) == record_bytes(obj)  # there: at once


def test_gather_ends_at_the_forced_wakeup_as_the_fill_crosses_the_mark():
    """A sleep would not hear it: a burst while the reader gathers is drained long before the
    ring fills. Without the wakeup the call would wait its whole timeout."""
    with loaded(**wakeup_config(RING, EVERY)) as (obj, _ep):
        reader = RingBatchReader(obj.maps["vnet_events"])
        threshold, rec = RING // 4, record_bytes(obj)
        produce(obj, 1)  # data there from the start: no adaptive wakeup while it waits
        first_forced = next(k for k in range(EVERY, 10 * RING // rec, EVERY) if (k - 1) * rec >= threshold)
        burst = threading.Timer(0.2, produce, (obj, first_forced - 1))  # the thread keeps this one CPU
        burst.start()
        try:
            started = time.monotonic()
            pending = reader.gather(threshold, SIGNALLED_S * 1000)
            waited = time.monotonic() - started
        finally:
            burst.join()
        assert pending >= threshold
        assert waited < SIGNALLED_S


def test_hold_reads_a_first_record_and_a_fast_flow_at_once_and_paces_a_slow_one():
    with loaded(**wakeup_config(RING, EVERY)) as (obj, _ep):
        reader = RingBatchReader(obj.maps["vnet_events"])
        want, rec = RING // 4, record_bytes(obj)
        produce(obj, 1)
        assert not reader.hold(want, 10.0, 100, 20)  # after a quiet spell (10 s since the last batch)
        assert not reader.hold(rec, 0.001, 100, 20)  # `want` is there
        produce(obj, 99)
        assert not reader.hold(want, 0.0001, 100, 20)  # 100 records in 0.1 ms: `want` within a ms
        started = time.monotonic()
        assert reader.hold(want, 0.01, 100, 20)  # 100 records in 10 ms: let more come, at most 20 ms
        assert 0.02 <= time.monotonic() - started < SIGNALLED_S
        assert reader.read().count == 100
