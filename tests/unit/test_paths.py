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
