"""The kernel's aggregation table (vnet_agg_last: 4-way sets indexed by pkt_id, shared by
every CPU) and its per-CPU histogram cells, driven through the real tc program with
BPF_PROG_TEST_RUN: which CPU a hop runs on is chosen by pinning this thread, and which
packets share a set by their pkt_ids. Nothing here is timed: the tests count.

Two instances of tc_trace stand for two hooks of a path (probe 0 then probe 1), as two
devices of a trace would; in the check mode (aggregate_and_events) they also emit the
events, which give the pkt_ids."""

from __future__ import annotations

import os
import struct

import pytest
from kernel_support import on_cpu

from vnet.trace.session import Plan, Trace

pytestmark = pytest.mark.kernel

PROG = "vnet_tc_ingress"
A, B = "probe0:tc_ingress", "probe1:tc_ingress"  # the points' names: the plans carry no labels


def frame(ip_id: int, payload: bytes = b"agg-table") -> bytes:
    """An Ethernet/IPv4/UDP frame; the IP ID makes its pkt_id."""
    udp = struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ip_id, 0x4000, 64, 17, 0,
                     bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip + udp


def plans() -> list[Plan]:
    return [Plan("tc_trace", "tc_cfg", {"l3": 0}, (PROG,), lambda _obj: [], {}, name=f"dev:agg{i}", filterable=True)
            for i in range(2)]


def run(trace: Trace, probe: int, data: bytes, cpu: int | None = None) -> None:
    prog = trace.objects[probe].programs[PROG]
    if cpu is None:
        prog.test_run(data)
    else:
        with on_cpu(cpu):
            prog.test_run(data)


def set_of(pkt_id: int, trace: Trace) -> int:
    """Which set of vnet_agg_last a packet goes to (bits 32 and up of pkt_id, as the programs take them)."""
    return (pkt_id >> 32) & (trace.btf.enum("vnet_agg")["VNET_AGG_SETS"] - 1)


def cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def test_hops_on_different_cpus_are_paired_and_summed():
    """A packet's next hop on another CPU (RPS, a vhost or backlog thread) finds its entry:
    the table is shared. The histogram cells are per CPU; the sum is every pair."""
    if len(cpus()) < 2:
        pytest.skip("needs two CPUs")
    c0, c1 = cpus()[:2]
    n = 40
    with Trace(plans(), aggregate=True) as t:
        for i in range(n):
            data = frame(100 + i)
            run(t, 0, data, (c0, c1)[i % 2])
            run(t, 1, data, (c0, c1)[(i // 2) % 2])  # every combination of the two CPUs
        points, hists = t.aggregates()
    assert (points[A].packets, points[A].first) == (n, n)
    assert (points[B].packets, points[B].first) == (n, 0)
    assert list(hists) == [(A, B)] and hists[A, B].total == n


def test_a_hop_whose_entry_was_replaced_is_counted_as_first():
    """Five packets in one 4-way set: the first one's entry is gone when its next hop
    comes, and that hop counts as `first` (no earlier hop), not as nothing."""
    ways = None
    with Trace(plans(), aggregate_and_events=True, ring_bytes=16 << 20) as t:
        ways = t.btf.enum("vnet_agg")["VNET_AGG_WAYS"]
        by_set: dict[int, list[int]] = {}
        for ip_id in range(1, 40000):  # ~2.4 packets per set: some set gets ways + 1
            run(t, 0, frame(ip_id))
        for ev in t.drain():
            by_set.setdefault(set_of(int(ev["pkt_id"], 16), t), []).append(ev["ip_id"])
    crowded = next(ids for ids in by_set.values() if len(ids) > ways)[:ways + 1]
    with Trace(plans(), aggregate=True) as t:
        for ip_id in crowded:            # hop 1 of each, in order: the last replaces the first
            run(t, 0, frame(ip_id))
        for ip_id in reversed(crowded):  # hop 2, newest first (a miss inserts, and would push out the next)
            run(t, 1, frame(ip_id))
        points, hists = t.aggregates()
    assert points[A].first == ways + 1
    assert (points[B].packets, points[B].first) == (ways + 1, 1)
    assert hists[A, B].total == ways


def test_events_without_a_packet_are_never_paired():
    """A function probe's call without a packet has no pkt_id (0): each counts as first at
    its point, and no histogram pairs two different calls that share the id 0."""
    import dataclasses

    from vnet.probes import catalog
    from vnet.probes import resolve as resolver

    spec = catalog.BY_NAME["net:netif_receive_skb"]
    res = resolver.resolve(spec, force="raw_tp")
    if not res.available:
        pytest.skip(f"net:netif_receive_skb@raw_tp: {res.why_not}")
    plan = dataclasses.replace(resolver.plan(res), attach=lambda _obj: [], labels={})
    ctx = bytes(8 * 6)  # six zero arguments: no sk_buff
    with Trace([plan, plan], aggregate=True) as t:
        for _ in range(3):
            for probe in (0, 1):
                t.objects[probe].programs[plan.programs[-1]].test_run(None, ctx=ctx)
        points, hists = t.aggregates()
    assert [(p.packets, p.first) for p in points.values()] == [(3, 3), (3, 3)]
    assert hists == {}


def test_the_same_point_twice_is_no_segment():
    """A packet seen again at the same point (a clone, a loop) moves its time, adds no pair."""
    with Trace(plans(), aggregate=True) as t:
        data = frame(7)
        run(t, 0, data)
        run(t, 0, data)
        run(t, 1, data)
        points, hists = t.aggregates()
    assert (points[A].packets, points[A].first, points[B].first) == (2, 1, 0)
    assert hists[A, B].total == 1
