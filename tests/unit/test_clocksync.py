"""Clock maps (vnet.analysis.clocksync), pure logic on synthetic clocks: a guest whose
clock is off by a known offset that drifts, packets crossing both ways with known
one-way delays, pings with known round trips. The estimates must land inside the
bounds they state, and the bounds must be tight enough to be useful."""

from __future__ import annotations

import numpy as np
import pytest

from vnet.analysis.clocksync import ClockMap, Crossings, crossings, fit_pair, from_pings, hop_role, refine
from vnet.analysis.stream import PacketTable, PathRows, retime

S = 1_000_000_000
T0 = 5_000 * S


def true_offset(t, off=730_000, ppm=-80.0):
    """The guest's clock minus the host's at host time t (a software guest that runs slow)."""
    return off + (t - T0) * ppm * 1e-6


def test_pings_give_a_line_inside_its_bound():
    rng = np.random.default_rng(3)
    samples = []
    for k in range(40):  # every 5 s for 200 s, round trips of 0.2-3 ms
        t = T0 + k * 5 * S
        rtt = int(rng.uniform(200_000, 3_000_000))
        asym = rng.uniform(-0.5, 0.5) * rtt   # where in the round trip the agent answered
        off = int(true_offset(t) + asym)
        samples.append({"offset_ns": off, "error_ns": rtt // 2, "agent_mono_ns": int(t + true_offset(t))})
    m = from_pings(samples)
    assert m.source == "ping" and m.pings >= 5
    for t in range(T0, T0 + 200 * S, 10 * S):
        assert abs(m.at(t + int(true_offset(t))) - true_offset(t)) <= m.error_ns
    assert m.drift * 1e6 == pytest.approx(-80, abs=15)


def test_one_ping_is_a_constant():
    m = from_pings([{"offset_ns": 500, "error_ns": 20, "at_ns": 10}, {"offset_ns": 900, "error_ns": 4000}])
    assert (m.offset_ns, m.drift, m.error_ns) == (500, 0.0, 20)
    assert from_pings([]).source == "none" and from_pings([{"offset_ns": "x"}]).source == "none"


def test_a_damaged_ping_past_int64_is_left_out():
    """Found by the collector fuzz: a clock chunk with a value past int64 crashed `vnet analyze`."""
    m = from_pings([{"offset_ns": 500, "error_ns": 20, "at_ns": 10},
                    {"offset_ns": 1 << 70, "error_ns": 5, "at_ns": 10},
                    {"offset_ns": 7, "error_ns": 5, "agent_mono_ns": -(1 << 64)}])
    assert (m.offset_ns, m.drift, m.error_ns) == (500, 0.0, 20)


def _crossings(n=4000, eps=250_000, eps_ppm=30.0, d_min=40_000, seed=1, one_way=False, hooks=False):
    """Packets between host a and guest b over 60 s; b's clock (on the collector's scale)
    is wrong by eps + drift. Each packet spends 5-50 us on each host."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(T0, T0 + 60 * S, n)).astype(np.int64)
    e = (eps + (t - T0) * eps_ppm * 1e-6).astype(np.int64)
    delay = (d_min + rng.exponential(30_000, n)).astype(np.int64)
    on_a, on_b = rng.integers(5_000, 50_000, n), rng.integers(5_000, 50_000, n)
    ab = np.ones(n, bool) if one_way else rng.random(n) < 0.5
    fa = np.where(ab, t, t + on_b + delay)
    la = fa + on_a
    fb = np.where(ab, la + delay, t) + e
    lb = fb + on_b
    mid = (fb + lb) // 2 - (fa + la) // 2
    said = np.where(ab, 1, -1) if hooks else np.zeros(n)
    return Crossings(t, mid, fb - la, fa - lb, said.astype(np.int8)), e, t


def test_packets_both_ways_bound_the_offset_and_its_drift():
    c, truth, t = _crossings()
    f = fit_pair(c)
    assert f.source == "packets" and f.windows >= 5 and f.n_ab + f.n_ba == t.size
    est = f.eps_ns + f.drift * (t - f.t_ref)
    assert np.abs(est - truth).max() <= f.bound
    assert f.bound < 50_000   # pings of 1.5 ms: the half-sum of the fastest crossings each way (40 us)
    assert f.drift * 1e6 == pytest.approx(30, abs=5)


@pytest.mark.parametrize("hooks", [True, False])
def test_one_way_traffic_only_enforces_causality(hooks):
    # without the hooks' word the midpoints must lean the right way: the clock error
    # smaller than the crossing plus the packet's time on both hosts
    eps = -300_000 if hooks else -40_000
    c, truth, _ = _crossings(one_way=True, eps=eps, eps_ppm=0, hooks=hooks)
    f = fit_pair(c)
    assert f.source == "causality" and f.bound is None and f.n_ba == 0
    # the guest's clock showed arrivals before departures: moved just enough
    assert eps <= f.eps_ns <= eps + 45_000


def test_without_hooks_the_widest_consistent_gap_splits_the_two_ways():
    c, truth, t = _crossings(eps=-250_000, eps_ppm=0)
    f = fit_pair(c)
    assert f.source == "packets" and abs(f.n_ab - f.n_ba) < 400
    assert np.abs(f.eps_ns + f.drift * (t - f.t_ref) - truth).max() <= f.bound < 50_000


def test_the_hooks_say_which_way_when_the_clocks_cannot():
    assert [hop_role(n) for n in ("[h] tap0:egress", "[g] net:netif_receive_skb eth0", "eth0:ingress",
                                  "[g] net:net_dev_start_xmit eth0", "sock:consume_skb", "[h] tun:get_user")] \
        == [1, -1, -1, 1, 0, -1]


def _table(times_by_path, names, hop_host, clocks):
    paths = []
    for hops, times in times_by_path:
        times = np.asarray(times, np.int64)
        paths.append(PathRows(hops, [(times[:, 0].copy(), np.arange(len(times), dtype=np.uint64),
                                      np.diff(times, axis=1))]))
    return PacketTable(paths, names, np.array(hop_host, np.int32), [], [c.error_ns for c in clocks],
                       [c.offset_ns for c in clocks], clocks=clocks)


def test_refine_moves_the_guest_clock_and_states_the_pair_bound():
    """Host (0): tap egress/ingress; guest (1): its NIC's receive and transmit. The pings
    left the guest 150 us off, less than their ±400 us; the crossing takes 20-60 us."""
    rng = np.random.default_rng(7)
    names = ["[host] tap0:egress", "[host] tap0:ingress", "[guest] net:netif_receive_skb eth0",
             "[guest] net:net_dev_start_xmit eth0"]
    wrong = 150_000
    req, rep = [], []
    for k in range(600):
        t = T0 + k * 50_000_000
        d1, d2 = 20_000 + rng.integers(0, 40_000), 20_000 + rng.integers(0, 40_000)
        req.append([t, t + d1 + wrong])                       # host egress -> guest receive
        rep.append([t + 300_000 + wrong, t + 300_000 + d2])   # guest transmit -> host ingress
    clocks = [ClockMap(0, error_ns=3_000, source="ping", pings=8),
              ClockMap(0, error_ns=400_000, source="ping", pings=8)]
    table = _table([((0, 2), req), ((3, 1), rep)], names, [0, 0, 1, 1], clocks)
    c = crossings(table)[(0, 1)]
    assert (c.hooks == 1).sum() == 600 and (c.hooks == -1).sum() == 600
    host, guest = refine(clocks, table)
    assert host is clocks[0] and guest.source == "packets" and guest.ref == 0
    for t in (T0, T0 + 15 * S, T0 + 30 * S):
        assert abs(guest.at(t + wrong) - wrong) <= guest.error_ns - host.error_ns <= 30_000
    assert guest.crossings == (600, 600)
    retime(table, [host, guest])
    assert table.clocks == [host, guest] and table.pair_error(0, 2) == guest.error_ns - host.error_ns
    by_hops = {p.hops: p for p in table.paths}
    assert set(by_hops) == {(0, 2), (3, 1)}            # no packet changed order
    for p in by_hops.values():                         # the crossings: 20-60 us, each way
        seg = p.column(0)
        assert seg.min() >= 20_000 - 30_000 and seg.max() <= 60_000 + 30_000


def test_a_guest_a_day_behind_with_a_drifting_ping_line_is_moved_by_what_the_packets_say():
    """Found in the vm-boundary demo: a QEMU guest's clock was 71,359 s behind the collector's
    and its two pings gave a 94 ppm line anchored 1,500 s before the run. The correction was
    anchored at t_ref + at(t_ref), a collector time read as a host time: 71,359 s of drift
    (6.7 s) off, so the offset moved 632 us less than the packets said, and the guest's
    request hops sorted before the host's. Each correction must land within the pair's bound."""
    rng = np.random.default_rng(9)
    names = ["[host] tap0:egress", "[host] tap0:ingress", "[guest] net:netif_receive_skb eth0",
             "[guest] net:net_dev_start_xmit eth0"]
    behind, ppm, wrong = -71_359 * S, 94e-6, 600_000
    ping = ClockMap(behind, ppm, T0 - 1_500 * S + behind, 1_771_000, "ping", 2)
    req, rep = [], []
    for k in range(600):   # collector times on the ping clocks: the guest's `wrong` too late
        t = T0 + k * 10_000_000
        d1, d2 = 20_000 + rng.integers(0, 40_000), 20_000 + rng.integers(0, 40_000)
        req.append([t, t + d1 + wrong])
        rep.append([t + 300_000 + wrong, t + 300_000 + d2])
    clocks = [ClockMap(0, error_ns=3_000, source="ping", pings=8), ping]
    table = _table([((0, 2), req), ((3, 1), rep)], names, [0, 0, 1, 1], clocks)
    host, guest = refine(clocks, table)
    bound = guest.error_ns - host.error_ns
    assert guest.source == "packets" and bound <= 30_000
    for t in (T0, T0 + 3 * S, T0 + 6 * S):
        h = ping.host_time(t)
        assert abs(guest.at(h) - ping.at(h) - wrong) <= bound, t
    retime(table, [host, guest])
    for p in table.paths:   # both crossings as they were: 20-60 us, within the bound
        assert p.hops in {(0, 2), (3, 1)}
        seg = p.column(0)
        assert seg.min() >= 20_000 - bound and seg.max() <= 60_000 + bound


def test_host_time_inverts_the_map():
    m = ClockMap(-71_359 * S, 94e-6, T0 - 1_500 * S - 71_359 * S)
    for t in (T0, T0 + 7 * S):
        h = m.host_time(t)
        assert m.to_collector(np.array([h], np.int64))[0] == pytest.approx(t, abs=1)


def test_a_probe_that_fires_after_the_packet_left_does_not_end_its_stay():
    """The guest's transmit completion frees the reply (sock:consume_skb) after the host's
    tap has it: the crossing still ends at the guest's transmit, and the clock comes out."""
    rng = np.random.default_rng(11)
    names = ["[host] tap0:egress", "[host] tap0:ingress", "[guest] net:netif_receive_skb eth0",
             "[guest] net:net_dev_start_xmit eth0", "[guest] sock:consume_skb"]
    wrong = 150_000
    req, rep = [], []
    for k in range(600):
        t = T0 + k * 50_000_000
        d1, d2 = 20_000 + rng.integers(0, 40_000), 20_000 + rng.integers(0, 40_000)
        req.append([t, t + d1 + wrong])
        # guest transmit, host ingress, then the guest frees the sent packet 100-200 us later
        rep.append([t + 300_000 + wrong, t + 300_000 + d2, t + 300_000 + wrong + 100_000 + rng.integers(0, 100_000)])
    clocks = [ClockMap(0, error_ns=3_000, source="ping", pings=8),
              ClockMap(0, error_ns=400_000, source="ping", pings=8)]
    table = _table([((0, 2), req), ((3, 1, 4), rep)], names, [0, 0, 1, 1, 1], clocks)
    host, guest = refine(clocks, table)
    assert guest.source == "packets" and guest.crossings == (600, 600)
    for t in (T0, T0 + 15 * S, T0 + 30 * S):
        assert abs(guest.at(t + wrong) - wrong) <= guest.error_ns - host.error_ns <= 30_000


def test_retime_moves_a_packet_whose_hosts_change_order_to_its_new_path():
    names = ["[a] eth0:egress", "[b] eth0:ingress"]
    clocks = [ClockMap(0, error_ns=0, source="ping"), ClockMap(0, error_ns=100_000, source="ping")]
    table = _table([((1, 0), [[T0, T0 + 5_000], [T0 + S, T0 + S + 50_000]])], names, [0, 1], clocks)
    table.hosts = []
    retime(table, [clocks[0], ClockMap(-10_000, error_ns=20_000, source="causality")])
    got = {p.hops: p.rows(np.arange(p.count)).tolist() for p in table.paths}
    assert got == {(0, 1): [[5_000]], (1, 0): [[40_000]]}


def test_the_cli_chooses_the_clocks_and_refuses_a_bad_choice():
    """`vnet analyze --clocks pings|packets` on the recorded two-host fixture (both agents on
    one machine: the packets say hostB's clock is within 1 us of hostA's, the pings 43 us)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = root / "tests" / "fixtures" / "traces" / "two-hosts"
    if not files.exists():
        pytest.skip("no two-hosts fixture")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "vnet", "analyze", str(files), *args], cwd=root,
                              capture_output=True, text=True, timeout=120)

    by = {}
    for how in ("pings", "packets"):
        r = run("--json", "--clocks", how)
        assert r.returncode == 0, r.stderr
        by[how] = {h["host"]: h["clock"] for h in json.loads(r.stdout)["hosts"]}
    assert {c["source"] for c in by["pings"].values()} == {"ping"}
    assert by["packets"]["hostB"]["source"] == "causality" and by["packets"]["hostB"]["crossings"] == [30, 0]
    assert abs(by["packets"]["hostB"]["offset_ns"] - by["packets"]["hostA"]["offset_ns"]) < 1_000
    bad = run("--clocks", "ntp")
    assert bad.returncode not in (0, 1) and bad.stderr.count("\n") == 1 and "--clocks" in bad.stderr
