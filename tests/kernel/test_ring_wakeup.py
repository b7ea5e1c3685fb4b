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
