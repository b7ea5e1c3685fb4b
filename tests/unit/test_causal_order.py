"""A packet's hops across hosts in causal order (vnet.analysis.causal, via stream.retime),
pure logic on tables built by hand: a host and a QEMU guest whose clock is off by a
known amount against a stated bound. Where the bound cannot tell which of two hosts'
hops came first, the hooks decide (a packet leaves at an egress or a transmit and
arrives at an ingress or a receive); where it can, the time order stands."""

from __future__ import annotations

import numpy as np

from vnet.analysis.causal import _solve, orders
from vnet.analysis.clocksync import ClockMap, hop_traits
from vnet.analysis.stream import PacketTable, PathRows, retime

T0 = 5_000_000_000_000
NAMES = ["[hv] tap1:ingress", "[hv] tap2:egress", "[guest] net:napi_gro_receive_entry eth0",
         "[guest] sock:udp_read", "[guest] virtio:start_xmit eth0", "[hv] tap2:ingress", "[hv] tap1:egress",
         "[guest] sock:consume_skb"]
HOST = [0, 0, 1, 1, 1, 0, 0, 1]
BOUND = 100_000   # the guest's clock against the host's


def table(paths: dict[tuple[int, ...], list[list[int]]]) -> PacketTable:
    """Rows given as each hop's collector time; the guest refined against the host, ±BOUND."""
    rows = [PathRows(hops, [(np.array(t, np.int64)[:, 0].copy(), np.arange(len(t), dtype=np.uint64),
                             np.diff(np.array(t, np.int64), axis=1))]) for hops, t in paths.items()]
    clocks = [ClockMap(0, error_ns=2_000, source="ping"), ClockMap(0, error_ns=2_000 + BOUND, source="packets", ref=0)]
    return PacketTable(rows, NAMES, np.array(HOST, np.int32), [], [c.error_ns for c in clocks],
                       [0, 0], clocks=clocks)


def settled(t: PacketTable) -> dict[tuple[int, ...], list[list[int]]]:
    """retime onto its own clocks (the order only): each path's rows as segment times."""
    retime(t, t.clocks)
    return {p.hops: p.rows(np.arange(p.count)).tolist() for p in t.paths}


def test_within_the_bound_the_guest_receives_after_the_host_sent():
    # tap2 sent at +20 us; the guest's clock, 60 us early, says it received at -30 us: before
    # the host even had the frame at tap1 (0). The bound (100 us) cannot tell: the hooks can.
    t = table({(2, 0, 1, 3): [[T0 - 30_000, T0, T0 + 20_000, T0 + 400_000]]})
    assert settled(t) == {(0, 1, 2, 3): [[20_000, -50_000, 430_000]]}
    assert t.pair_error(1, 2) == BOUND


def test_beyond_the_bound_the_time_order_stands():
    # the guest's receive 150 us before the host's tap2 egress: more than the bound, so
    # certain; the path says so rather than hide a clock that broke its bound
    t = table({(2, 0, 1, 3): [[T0 - 150_000, T0 - 100_000, T0, T0 + 400_000]]})
    assert settled(t) == {(2, 0, 1, 3): [[50_000, 100_000, 400_000]]}


def test_a_reply_leaves_the_guest_before_the_host_takes_it():
    # the guest's clock 80 us late: its transmit seems 50 us after the host's tap2 ingress
    t = table({(5, 4, 6): [[T0, T0 + 50_000, T0 + 10_000]], (3, 5, 4, 6): [[T0 - 900_000, T0, T0 + 50_000,
                                                                            T0 + 10_000]]})
    got = settled(t)
    assert got == {(4, 5, 6): [[-50_000, 10_000]], (3, 4, 5, 6): [[950_000, -50_000, 10_000]]}


def test_a_packet_that_comes_back_keeps_both_stays_on_the_host():
    # host -> guest (it forwards) -> host: the guest's receive ambiguous with the host's tap2
    # egress, its read and transmit clearly after it and clearly before the host's tap2 ingress
    row = [T0, T0 + 10_000, T0 - 20_000, T0 + 860_000, T0 + 880_000, T0 + 1_000_000]
    t = table({(0, 1, 2, 3, 4, 5): [row]})
    assert settled(t) == {(0, 1, 2, 3, 4, 5): [[10_000, -30_000, 880_000, 20_000, 120_000]]}


def test_a_return_blurred_at_both_ends_keeps_the_time_order():
    # the same, the host's tap2 ingress now within the bound of the guest's transmit: one stay
    # per host would need the guest both before and after the host; the time order stands
    row = [T0, T0 + 10_000, T0 - 20_000, T0 + 860_000, T0 + 880_000, T0 + 950_000]
    t = table({(0, 1, 2, 3, 4, 5): [row]})
    assert list(settled(t)) == [(2, 0, 1, 3, 4, 5)]


def test_a_free_after_the_packet_left_is_placed_by_its_time():
    # sock:consume_skb in the guest fires at transmit completion, after the host took the reply
    t = table({(4, 5, 7, 6): [[T0, T0 + 30_000, T0 + 60_000, T0 + 90_000]],
               (7, 4, 5, 6): [[T0 - 10_000, T0, T0 + 30_000, T0 + 90_000]]})
    got = settled(t)
    assert got == {(4, 5, 7, 6): [[30_000, 30_000, 30_000]], (7, 4, 5, 6): [[10_000, 30_000, 60_000]]}


def test_the_patterns_solve_as_each_row_alone_would():
    """orders() solves once per (time order, certain precedences) and skips rows whose time
    order is forced hop by hop: the same answer as solving every row by itself."""
    rng = np.random.default_rng(5)
    hops = [0, 1, 2, 3, 7, 4, 5, 6]
    hosts = np.array([HOST[h] for h in hops])
    roles, after = hop_traits([NAMES[h] for h in hops])
    base = np.array([0, 10, 40, 300, 330, 320, 360, 370], np.int64) * 1_000
    t = base + rng.integers(-120_000, 120_000, (4000, 1)) * (hosts == 1) + rng.integers(0, 30_000, (4000, 8))
    t += T0

    def bound(a, b):
        return BOUND

    got = orders(t, hosts, roles, after, bound)
    pairs = [(i, j) for i in range(8) for j in range(i + 1, 8) if hosts[i] != hosts[j]]
    for r in range(0, 4000, 7):
        sig = np.argsort(t[r], kind="stable")
        cert = np.array([int(t[r, j] - t[r, i] > BOUND) - int(t[r, i] - t[r, j] > BOUND) for i, j in pairs], np.int8)
        assert got[r].tolist() == _solve(sig, cert, pairs, hosts, roles, after).tolist(), r
    # each row keeps every hop once, and each host's hops in that host's order
    assert (np.sort(got, axis=1) == np.arange(8)).all()
    tt, hh = np.take_along_axis(t, got, axis=1), hosts[got]
    for r in range(0, 4000, 13):
        for h in (0, 1):
            assert (np.diff(tt[r][hh[r] == h]) >= 0).all(), r
    # where the bound blurs the guest's receive with the host's tap2 egress (and with no host hop
    # is it certainly earlier) but the packet was clearly in the guest later and back on the
    # host after it, the host's egress comes first
    blurred = (np.abs(t[:, 2] - t[:, 1]) <= BOUND) & (t[:, 2] - t[:, 0] >= -BOUND)
    clear = (t[:, 3] - t[:, :2].max(axis=1) > BOUND) & (t[:, 6:].min(axis=1) - t[:, 5] > BOUND)
    assert (blurred & clear).sum() > 200
    assert (np.argmax(got == 1, axis=1) < np.argmax(got == 2, axis=1))[blurred & clear].all()
    assert (t[:, 2] < t[:, 1])[blurred & clear].sum() > 50   # where the time order said the other way
