"""Request/reply pairing (vnet.analysis.roundtrip) and leaving hops out
(stream.without_hops) on PacketTables built by hand from PathRows, with every
time chosen so that each pair, turnaround and segment is known exactly (no root,
no trace files)."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest

from vnet.analysis.bulk import Flow, HostEvents
from vnet.analysis.report import analyze
from vnet.analysis.roundtrip import REPLY_SUFFIX, describe, pair, reverse, round_trips
from vnet.analysis.stream import PacketTable, PathRows, without_hops

# A veth pair seen at both ends: requests go a:egress -> b:ingress, replies b:egress -> a:ingress.
VETH = ["a:egress", "b:ingress", "b:egress", "a:ingress"]
REQ, REP = (0, 1), (2, 3)


def synthetic_table(hop_names: list[str], paths: dict[tuple[int, ...], list[list[int]]], *, first_pkt: int = 1,
                    host: str = "synthetic", drops: dict | None = None) -> PacketTable:
    """A PacketTable made up here, not read from a trace: `paths` maps a hop sequence (indexes
    into hop_names) to its packets, each given as its absolute times (ns) at those hops. Packets
    get pkt_ids first_pkt, first_pkt + 1, ... in the order given; segment times are int32, as the
    stream join stores them when they fit."""
    rows, pkt, events = [], first_pkt, 0
    for hops, times in paths.items():
        t = np.array(times, np.int64).reshape(len(times), len(hops))
        ids = np.arange(pkt, pkt + len(times), dtype=np.uint64)
        pkt += len(times)
        events += t.size
        rows.append(PathRows(tuple(hops), [(t[:, 0].copy(), ids, np.diff(t, axis=1).astype(np.int32))]))
    every = np.concatenate([np.array(v, np.int64).ravel() for v in paths.values()] or [np.empty(0, np.int64)])
    sched = {"ts": np.empty(0, np.int64)}
    return PacketTable(rows, list(hop_names), np.zeros(len(hop_names), np.int32),
                       [HostEvents(host, files=[f"{host}.vnt"], sched=sched)], [0], [0], drops or {}, sched,
                       int(every.min()) if every.size else 0, int(every.max()) if every.size else 0, events, [events])


def veth(requests: list[tuple[int, int]], replies: list[tuple[int, int]]) -> tuple[PacketTable, PacketTable]:
    """Requests and replies on VETH, each a (time at its first hop, time at its second)."""
    return (synthetic_table(VETH, {REQ: [list(x) for x in requests]} if requests else {}),
            synthetic_table(VETH, {REP: [list(x) for x in replies]} if replies else {}, first_pkt=1000))


def rows_of(p: PathRows) -> list[tuple[int, int, list[int]]]:
    """(first time, pkt_id, segment times) of every row of a path, in its order."""
    d = p.rows(np.arange(p.count))
    return [(int(f), int(k), [int(x) for x in r]) for f, k, r in zip(p.first_ts, p.pkt_id, d)]


def only_path(table: PacketTable) -> PathRows:
    assert len(table.paths) == 1, [p.hops for p in table.paths]
    return table.paths[0]


CLEAN = {"unanswered_requests": 0, "unpaired_replies": 0, "vanished_requests": 0}


# -- pairing ------------------------------------------------------------------------------------------


def test_pipelined_requests_pair_in_order_and_the_turnaround_is_reply_first_minus_request_last():
    # Three requests out before the first reply (pipelining), then a fourth between replies.
    # Request i: sent at s, at b 2 ns later; its reply leaves b at r, reaches a 3 ns later.
    sent = [0, 10, 20, 130]
    answered = [100, 120, 125, 200]
    q, r = veth([(s, s + 2) for s in sent], [(t, t + 3) for t in answered])
    trips, counts = round_trips(q, r, max_wait_ns=1_000)
    assert counts == {"requests": 4, "replies": 4, "pairs": 4, **CLEAN}
    p = only_path(trips)
    h = len(VETH)
    assert p.hops == (0, 1, h + 2, h + 3)
    assert [trips.hop_names[x] for x in p.hops] == VETH  # no hop of the replies is on a request's path
    # request hops, the turnaround (reply's first time - request's last), reply hops
    assert rows_of(p) == [(s, 1 + i, [2, t - (s + 2), 3]) for i, (s, t) in enumerate(zip(sent, answered))]
    assert list(p.e2e()) == [t + 3 - s for s, t in zip(sent, answered)]
    qi, ri, same = pair(q, r, max_wait_ns=1_000)
    assert same == counts and qi.tolist() == [0, 1, 2, 3] and ri.tolist() == [0, 1, 2, 3]
    assert describe(counts) == "4 round trips paired from 4 requests and 4 replies (in order)."


def test_pairing_follows_time_not_the_order_rows_are_stored_in():
    # The same conversation, each table's rows shuffled and split over two parts (as windows leave them).
    sent, answered = [0, 10, 20, 130], [100, 120, 125, 200]
    order = [2, 0, 3, 1]
    q = synthetic_table(VETH, {REQ: [[sent[i], sent[i] + 2] for i in order]})
    r = synthetic_table(VETH, {REP: [[answered[i], answered[i] + 3] for i in order[::-1]]}, first_pkt=1000)
    for t in (q, r):
        (f, k, d), = t.paths[0].parts
        t.paths[0] = PathRows(t.paths[0].hops, [(f[:2], k[:2], d[:2]), (f[2:], k[2:], d[2:])])
    trips, counts = round_trips(q, r, max_wait_ns=1_000)
    assert counts["pairs"] == 4 and counts["unanswered_requests"] == counts["unpaired_replies"] == 0
    got = rows_of(only_path(trips))
    assert [(f, d) for f, _, d in got] == [(s, [2, t - s - 2, 3]) for s, t in zip(sent, answered)]
    assert [k for _, k, _ in got] == [1 + order.index(i) for i in range(4)]  # each request keeps its pkt_id


def test_a_lost_reply_is_counted_and_the_timeout_realigns_the_pairs_behind_it():
    # One at a time: request 1's reply is lost, the client gives up and sends request 2 much later.
    sent = [0, 100, 5_000, 5_100]
    replies = [50, 5_050, 5_150]  # to requests 0, 2, 3
    q, r = veth([(s, s + 2) for s in sent], [(t, t + 3) for t in replies])
    trips, counts = round_trips(q, r, max_wait_ns=1_000)
    assert counts == {"requests": 4, "replies": 3, "pairs": 3,
                      "unanswered_requests": 1, "unpaired_replies": 0, "vanished_requests": 0}
    assert [(f, d) for f, _, d in rows_of(only_path(trips))] == [(0, [2, 48, 3]), (5_000, [2, 48, 3]),
                                                                 (5_100, [2, 48, 3])]
    text = describe(counts)
    assert text.startswith("3 round trips paired from 4 requests and 3 replies (in order).")
    assert "1 requests got no reply and 0 replies had no request" in text and "shifted" in text
    # Waiting longer than the client did: every pair behind the lost reply is shifted by one
    # (what the counts, and describe's warning, are there to reveal).
    trips, counts = round_trips(q, r, max_wait_ns=10_000)
    assert counts == {"requests": 4, "replies": 3, "pairs": 3,
                      "unanswered_requests": 1, "unpaired_replies": 0, "vanished_requests": 0}
    assert [(f, d[1]) for f, _, d in rows_of(only_path(trips))] == [(0, 48), (100, 5_050 - 102), (5_000, 5_150 - 5_002)]


def test_a_request_that_vanished_on_the_way_takes_no_reply():
    """Found in the vm-boundary demo: the guest's socket queue overflowed, and the requests it
    dropped (seen queued, never read) took the replies of the requests read after them, every
    pair behind shifted. A request whose path stops short of the others' never reached the far
    end: it is unanswered (and counted as vanished), and the pairs behind it stay in place."""
    # a:egress -> b:ingress -> b:read; the second request is dropped at b before the read
    names = VETH + ["b:read"]
    sent = [0, 100, 200]
    q = synthetic_table(names, {(0, 1, 4): [[0, 2, 40], [200, 202, 240]], (0, 1): [[100, 102]]})
    r = synthetic_table(names, {REP: [[50, 53], [250, 253]]}, first_pkt=1000)
    trips, counts = round_trips(q, r, max_wait_ns=10_000)
    assert counts == {"requests": 3, "replies": 2, "pairs": 2, "unanswered_requests": 1, "unpaired_replies": 0,
                      "vanished_requests": 1}
    got = rows_of(only_path(trips))
    assert [(f, d) for f, _, d in got] == [(s, [2, 38, 10, 3]) for s in (sent[0], sent[2])]
    text = describe(counts)
    assert "1 requests vanished on the way" in text and "got no reply" not in text
    assert pair(q, r, max_wait_ns=10_000)[2] == counts


def test_a_request_whose_last_event_was_lost_still_gets_its_reply():
    # the same path, but the second request's read event was lost (the far end answered it):
    # no whole request is waiting when its reply leaves, so the short one takes it
    names = VETH + ["b:read"]
    q = synthetic_table(names, {(0, 1, 4): [[0, 2, 40], [200, 202, 240]], (0, 1): [[100, 102]]})
    r = synthetic_table(names, {REP: [[50, 53], [150, 153], [250, 253]]}, first_pkt=1000)
    trips, counts = round_trips(q, r, max_wait_ns=10_000)
    assert counts == {"requests": 3, "replies": 3, "pairs": 3, **CLEAN}
    assert sorted((f, tuple(d)) for p in trips.paths for f, _, d in rows_of(p)) == [
        (0, (2, 38, 10, 3)), (100, (2, 48, 3)), (200, (2, 38, 10, 3))]


def test_a_request_still_waiting_at_the_end_is_unanswered():
    q, r = veth([(0, 2), (100, 102)], [(50, 53)])
    _, counts = round_trips(q, r, max_wait_ns=1_000)
    assert counts == {"requests": 2, "replies": 1, "pairs": 1,
                      "unanswered_requests": 1, "unpaired_replies": 0, "vanished_requests": 0}


def test_a_reply_before_any_request_is_unpaired():
    # A reply at -50 (a stale one from before the trace), then a clean exchange. A reply that
    # leaves while its request is still on its way (last sighting after the reply's first) has
    # no request either.
    q, r = veth([(0, 2), (1_000, 1_010)], [(-50, -47), (60, 63), (1_005, 1_008), (1_100, 1_103)])
    trips, counts = round_trips(q, r, max_wait_ns=10_000)
    assert counts == {"requests": 2, "replies": 4, "pairs": 2,
                      "unanswered_requests": 0, "unpaired_replies": 2, "vanished_requests": 0}
    assert [(f, d) for f, _, d in rows_of(only_path(trips))] == [(0, [2, 58, 3]), (1_000, [10, 90, 3])]
    assert "0 requests got no reply and 2 replies had no request" in describe(counts)


def test_nothing_to_pair():
    q, r = veth([], [])
    trips, counts = round_trips(q, r)
    assert trips.paths == [] and counts == {"requests": 0, "replies": 0, "pairs": 0, **CLEAN}
    q, r = veth([(0, 2)], [])
    trips, counts = round_trips(q, r)
    assert trips.paths == [] and counts["unanswered_requests"] == 1
    q, r = veth([], [(0, 3)])
    trips, counts = round_trips(q, r)
    assert trips.paths == [] and counts["unpaired_replies"] == 1


def test_a_reply_hop_also_on_a_request_path_is_named_as_the_reply():
    # Through a bridge both ways: br0:forward sees the request and the reply.
    names = ["eth0:egress", "br0:forward", "vm:ingress", "vm:egress", "eth0:ingress"]
    q = synthetic_table(names, {(0, 1, 2): [[0, 5, 9], [1_000, 1_004, 1_010]]})
    r = synthetic_table(names, {(3, 1, 4): [[40, 46, 50], [1_070, 1_075, 1_082]]}, first_pkt=100)
    trips, counts = round_trips(q, r)
    assert counts == {"requests": 2, "replies": 2, "pairs": 2, **CLEAN}
    p = only_path(trips)
    assert [trips.hop_names[x] for x in p.hops] == ["eth0:egress", "br0:forward", "vm:ingress", "vm:egress",
                                                    "br0:forward" + REPLY_SUFFIX, "eth0:ingress"]
    assert rows_of(p) == [(0, 1, [5, 4, 31, 6, 4]), (1_000, 2, [4, 6, 60, 5, 7])]
    assert trips.hop_host.size == len(trips.hop_names) == 2 * len(names)
    report = analyze(trips)
    segs = {(s["from"], s["to"]) for s in report["segments"]}
    assert ("vm:egress", "br0:forward (reply)") in segs and ("br0:forward (reply)", "eth0:ingress") in segs
    assert ("eth0:egress", "br0:forward") in segs


def test_two_request_paths_and_one_reply_path_make_two_round_trip_paths():
    # Requests 0 and 2 go a:egress -> b:ingress; request 1 is also seen at a probe between them.
    names = VETH + ["b:netif_receive_skb"]
    q = synthetic_table(names, {(0, 1): [[0, 2], [200, 203]], (0, 4, 1): [[100, 101, 104]]})
    r = synthetic_table(names, {REP: [[50, 53], [150, 152], [260, 265]]}, first_pkt=10)
    trips, counts = round_trips(q, r)
    assert counts == {"requests": 3, "replies": 3, "pairs": 3, **CLEAN}
    h = len(names)
    by_hops = {p.hops: p for p in trips.paths}
    assert set(by_hops) == {(0, 1, h + 2, h + 3), (0, 4, 1, h + 2, h + 3)}
    assert rows_of(by_hops[(0, 1, h + 2, h + 3)]) == [(0, 1, [2, 48, 3]), (200, 2, [3, 57, 5])]
    assert rows_of(by_hops[(0, 4, 1, h + 2, h + 3)]) == [(100, 3, [1, 3, 46, 2])]
    report = analyze(trips)
    assert report["packets"] == 3 and [p["count"] for p in report["paths"]] == [2, 1]


def test_the_round_trips_keep_both_tables_events_and_drops():
    drop = {"ts": np.array([70], np.int64), "pkt_id": np.array([11], np.uint64), "reason": np.array([2], np.uint32),
            "host": np.array([0], np.int32), "last_hop": np.array([2], np.int64),
            "first_ts": np.array([60], np.int64)}
    q = synthetic_table(VETH, {REQ: [[0, 2], [100, 102]]})
    r = synthetic_table(VETH, {REP: [[50, 53]], (2,): [[160]]}, first_pkt=10, drops=drop)
    trips, counts = round_trips(q, r)
    assert counts["pairs"] == 2 and trips.count == 4 + 3 and trips.packet_events == [7]
    assert (trips.t_first, trips.t_last) == (0, 160)
    report = analyze(trips)
    assert report["hosts"][0]["packet_events"] == 7 and report["hosts"][0]["drop_events"] == 1
    # the reply's drop, after its first hop: named as the round trip's hop
    assert report["drops"]["kfree_skb"] == [{"reason": "2", "last_hop": "b:egress", "packets": 1}]
    assert trips.hop_names[trips.drops["last_hop"][0]] == "b:egress"


def test_tables_from_different_files_are_refused():
    q = synthetic_table(VETH, {REQ: [[0, 2]]})
    r = synthetic_table(VETH, {REP: [[5, 8]]}, host="elsewhere")
    with pytest.raises(ValueError, match="same trace files"):
        round_trips(q, r)


@pytest.mark.parametrize("slow", [0, 1, 2])
def test_the_report_names_the_turnaround_when_it_makes_the_tail(slow):
    # 200 round trips, 5 us each way and 20 us turnaround; every 50th is 1 ms slower in one segment.
    base = [5_000, 20_000, 5_000]
    reqs, reps = [], []
    for i in range(200):
        d = list(base)
        if i % 50 == 7:
            d[slow] += 1_000_000
        t = i * 10_000_000
        reqs.append((t, t + d[0]))
        reps.append((t + d[0] + d[1], t + sum(d)))
    q, r = veth(reqs, reps)
    trips, counts = round_trips(q, r)
    assert counts == {"requests": 200, "replies": 200, "pairs": 200, **CLEAN}
    report = analyze(trips)
    p = report["paths"][0]
    assert p["hops"] == VETH and p["count"] == 200
    big = p["tail"]["segments"][p["tail"]["largest"]]
    want = [("a:egress", "b:ingress"), ("b:ingress", "b:egress"), ("b:egress", "a:ingress")][slow]
    assert (big["from"], big["to"]) == want and big["tail_share"] > 0.9
    assert f"accrues between {want[0]} and {want[1]}" in report["verdict"]
    turnaround = next(s for s in report["segments"] if (s["from"], s["to"]) == ("b:ingress", "b:egress"))
    assert turnaround["count"] == 200 and turnaround["min_ns"] == 20_000
    assert turnaround["max_ns"] == 20_000 + (1_000_000 if slow == 1 else 0)


# -- reverse ------------------------------------------------------------------------------------------


def test_reverse_swaps_addresses_and_ports_and_keeps_the_protocol():
    a, b = ipaddress.ip_network("10.0.0.1/32"), ipaddress.ip_network("10.0.1.0/24")
    assert reverse(Flow(17, a, b, 5000, 6000)) == Flow(17, b, a, 6000, 5000)
    assert reverse(Flow(proto=17, dport=7)) == Flow(proto=17, sport=7)
    assert reverse(reverse(Flow(6, a, None, None, 80))) == Flow(6, a, None, None, 80)


# -- without_hops -------------------------------------------------------------------------------------

ABCD = ["a", "b", "c", "d"]
# two packets a -> b -> c -> d
THROUGH = [[100, 110, 130, 160], [200, 205, 215, 230]]


def one_path():
    return synthetic_table(ABCD, {(0, 1, 2, 3): THROUGH})


@pytest.mark.parametrize("drop,hops,rows", [
    ("a", (1, 2, 3), [(110, 1, [20, 30]), (205, 2, [10, 15])]),       # the first: first_ts moves
    ("b", (0, 2, 3), [(100, 1, [30, 30]), (200, 2, [15, 15])]),       # a middle one: its segments merge
    ("d", (0, 1, 2), [(100, 1, [10, 20]), (200, 2, [5, 10])]),        # the last
])
def test_without_a_hop_its_events_are_left_out(drop, hops, rows):
    t = without_hops(one_path(), [drop])
    p = only_path(t)
    assert p.hops == hops and rows_of(p) == rows
    assert t.hop_names == ABCD and t.packets == 2 and t.events == 6
    r = analyze(t)
    assert r["packets"] == 2 and r["paths"][0]["hops"] == [ABCD[x] for x in hops]


def test_without_two_hops_and_without_all_but_one():
    p = only_path(without_hops(one_path(), ["a", "c"]))
    assert p.hops == (1, 3) and rows_of(p) == [(110, 1, [50]), (205, 2, [25])]
    p = only_path(without_hops(one_path(), ["a", "b", "c"]))
    assert p.hops == (3,) and rows_of(p) == [(160, 1, []), (230, 2, [])]


def test_paths_that_become_equal_are_merged_and_packets_only_at_dropped_hops_vanish():
    t = synthetic_table(ABCD, {(0, 1, 2, 3): THROUGH,      # pkt 1, 2
                               (0, 2, 3): [[300, 320, 330]],  # pkt 3: not seen at b
                               (1,): [[400], [500]],          # pkt 4, 5: seen at b only
                               (1, 2): [[600, 601]]})         # pkt 6
    out = without_hops(t, ["b"])
    assert sorted(p.hops for p in out.paths) == [(0, 2, 3), (2,)]
    merged = next(p for p in out.paths if p.hops == (0, 2, 3))
    assert merged.count == 3
    assert sorted(rows_of(merged)) == [(100, 1, [30, 30]), (200, 2, [15, 15]), (300, 3, [20, 10])]
    assert rows_of(next(p for p in out.paths if p.hops == (2,))) == [(601, 6, [])]
    assert out.packets == 4 and t.packets == 6  # the input is left as it was
    r = analyze(out)
    assert r["paths"][0]["hops"] == ["a", "c", "d"] and r["paths"][0]["count"] == 3
    seg = next(s for s in r["segments"] if (s["from"], s["to"]) == ("a", "c"))
    assert (seg["count"], seg["min_ns"], seg["max_ns"]) == (3, 15, 30)
    inst = out.instances()  # the per-event form of the merged table
    assert inst.count == 4 and inst.ts.size == 3 * 3 + 1


def test_without_hops_of_no_known_name_is_the_table_itself():
    t = one_path()
    assert without_hops(t, ["nosuch"]) is t and without_hops(t, []) is t


def test_without_hops_before_pairing_drops_a_hop_on_both_sides():
    # A hop that fires on both directions (a socket free, say) left out before the pairing.
    names = ["a:egress", "b:ingress", "b:egress", "a:ingress", "sock:consume_skb"]
    q = synthetic_table(names, {(0, 1, 4): [[0, 2, 9]]})
    r = synthetic_table(names, {(2, 3, 4): [[50, 53, 90]]}, first_pkt=10)
    trips, counts = round_trips(without_hops(q, ["sock:consume_skb"]), without_hops(r, ["sock:consume_skb"]))
    assert counts["pairs"] == 1
    p = only_path(trips)
    assert [trips.hop_names[x] for x in p.hops] == VETH and rows_of(p) == [(0, 1, [2, 48, 3])]
    # kept, the request's late free (at 9) is its last sighting: the turnaround shrinks to 41
    trips, _ = round_trips(q, r)
    p = only_path(trips)
    assert [trips.hop_names[x] for x in p.hops] == names[:2] + ["sock:consume_skb"] + names[2:4] + [
        "sock:consume_skb" + REPLY_SUFFIX]
    assert rows_of(p) == [(0, 1, [2, 7, 41, 3, 37])]
