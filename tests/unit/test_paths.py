"""Path reconstruction from events (pure logic on hand-made event dicts)."""

from vnet.analysis.paths import hop_latency, paths


def ev(pkt, probe, ts):
    return {"pkt_id": pkt, "probe": probe, "ts_ns": ts}


def test_events_group_by_pkt_id_in_time_order():
    events = [ev("b", "x:egress", 5), ev("a", "y:ingress", 30), ev("a", "x:egress", 10), ev("b", "y:ingress", 12)]
    ps = paths(events)
    assert [p.pkt_id for p in ps] == ["b", "a"]
    assert ps[1].hops == ["x:egress", "y:ingress"] and ps[1].total_ns == 20
    assert ps[0].deltas() == [("x:egress", "y:ingress", 7)]


def test_hop_latency_median_and_max():
    events = [ev(str(i), "x", 0) for i in range(3)] + [ev(str(i), "y", 10 * (i + 1)) for i in range(3)]
    assert hop_latency(paths(events)) == [("x", "y", 3, 20, 30)]


def test_follower_closes_a_path_at_the_last_hook_or_after_idle_time():
    from vnet.analysis.paths import PathFollower, format_path, path_record

    f = PathFollower(hooks=3, idle_ns=100)
    full = [dict(ev("a", p, t), proto="udp", src="1.1.1.1", dst="2.2.2.2", sport=1, dport=2, len=60,
                 wall_ns=t, ifname=None) for p, t in (("x", 1), ("y", 4), ("z", 9))]
    assert f.add(full[:2], now_ns=10) == []
    done = f.add(full[2:], now_ns=11)
    assert [p.hops for p in done] == [["x", "y", "z"]]
    rec = path_record(done[0])
    assert [h["delta_ns"] for h in rec["hops"]] == [0, 3, 5] and rec["total_ns"] == 8
    assert "x -> y +0.0us -> z +0.0us" in format_path(done[0]) and "UDP 1.1.1.1:1 > 2.2.2.2:2" in format_path(done[0])
    part = dict(full[0], pkt_id="b")
    assert f.add([part], now_ns=20) == []
    assert [p.pkt_id for p in f.add([], now_ns=200)] == ["b"]  # idle: only one of its hooks was on its way
    assert f.flush() == []


def test_log2_histogram_percentiles_and_rendering():
    from vnet.analysis.histogram import Log2Histogram, bucket_of

    assert [bucket_of(v) for v in (0, 1, 2, 3, 4, 1023, 1024)] == [0, 0, 1, 1, 2, 9, 10]
    h = Log2Histogram({10: 90, 12: 9, 20: 1})  # 100 packets
    assert (h.percentile_bucket(0.5), h.percentile_bucket(0.9), h.percentile_bucket(0.99)) == (10, 10, 12)
    assert h.percentile_bucket(1.0) == 20 and Log2Histogram.bounds(10) == (1024, 2048)
    lines = h.render()
    assert len(lines) == 1 + (20 - 10 + 1) and "90" in lines[1] and lines[1].count("*") == 40
