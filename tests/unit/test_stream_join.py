"""The streaming path join (vnet.analysis.stream) on synthetic traces (no root):
cutting the events into small windows, decoding hosts in child processes or
inline, gives the report that one window over everything gives; packets quiet for
longer than the gap are closed; clock chunks are found without reading events."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from synth_trace import Spec, write  # noqa: E402

from vnet.analysis.latency import order_by_packet  # noqa: E402
from vnet.analysis.report import analyze  # noqa: E402
from vnet.analysis.stream import path_hash, read_table  # noqa: E402
from vnet.collector.tracefile import TraceFileReader, TraceFileWriter  # noqa: E402

BIG = 1 << 30


def report(path, **kw):
    opts = {k: kw.pop(k) for k in ("window", "gap_ns", "parallel", "batch_bytes", "slack_ns") if k in kw}
    return analyze(read_table([path], **opts), **kw)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_small_windows_give_the_one_window_report(tmp_path, seed):
    spec = Spec(packets=3000, hooks=5, hosts=2, delays_ns=[5_000, 20_000, 8_000, 3_000], jitter_ns=3000, drop_after=2, drop_fraction=0.01, seed=seed,
                chunk_records=97)
    _, truth = write(spec, tmp_path / "a")
    truth.pkt_ids[1500:1600] = truth.pkt_ids[:100]  # some pkt_ids seen again 15 ms later
    write(spec, tmp_path / "b", truth)
    kw = {"slowest": 5, "hist": True}
    whole = report(tmp_path / "b", window=BIG, parallel=False, **kw)
    for window, parallel in ((64, False), (1000, True), (7919, False)):
        got = report(tmp_path / "b", window=window, parallel=parallel, batch_bytes=3000, **kw)
        assert got == whole, (window, parallel)
    # Gap 2 ms (the repeated ids, 15 ms later, are new packets), slack 300 us: packets on a
    # complete path close 300 us behind the hosts' front, the others (dropped ones: the start
    # of a longer path) wait out the gap. Closing early changes nothing.
    gap = report(tmp_path / "b", window=64, parallel=False, batch_bytes=3000, gap_ns=2_000_000,
                 slack_ns=2_000_000, **kw)
    for window, parallel in ((64, True), (500, False)):
        got = report(tmp_path / "b", window=window, parallel=parallel, batch_bytes=3000, gap_ns=2_000_000,
                     slack_ns=300_000, **kw)
        assert got == gap, (window, parallel)
    assert whole["packets"] == 3000 and whole["drops"]["kfree_skb"]


def test_since_until_and_drop_matching_survive_windows(tmp_path):
    spec = Spec(packets=2000, hooks=4, hosts=2, drop_after=1, drop_fraction=0.05, chunk_records=50)
    write(spec, tmp_path)
    kw = {"since": 0.004, "until": 0.012, "slowest": 3}
    assert report(tmp_path, window=100, batch_bytes=2000, **kw) == report(tmp_path, window=BIG, parallel=False, **kw)


def test_a_packet_quiet_for_longer_than_the_gap_is_closed(tmp_path):
    # one path of 4 hops, 5+20+8 us; with a 10 us gap every packet is cut where it waits longer
    spec = Spec(packets=500, hooks=4, inject_segment=None, sched=False, chunk_records=20)
    write(spec, tmp_path)
    whole = report(tmp_path)
    assert whole["packets"] == 500
    cut = report(tmp_path, gap_ns=10_000, window=64, parallel=False, batch_bytes=1)
    assert cut["packets"] > 500  # the 20 us segment no longer joins its two halves


def test_events_older_than_the_closed_packets_are_counted(tmp_path):
    spec = Spec(packets=400, hooks=4, inject_segment=None, sched=False, chunk_records=40)
    (path,), _ = write(spec, tmp_path / "a")
    src = TraceFileReader(path)
    chunks = [c for c in src.chunks() if c["kind"] != "header"]
    first = next(i for i, c in enumerate(chunks) if c["kind"] == "events")
    chunks.append(chunks.pop(first))  # the first events come last: 10 ms late
    (tmp_path / "b").mkdir()
    w = TraceFileWriter(tmp_path / "b" / path.name, src.header)
    for c in chunks:
        w.write(c.pop("kind"), **c)
    w.close()
    r = report(tmp_path / "b", gap_ns=1_000_000, window=64, parallel=False, batch_bytes=1)
    problems = [p for h in r["hosts"] for p in h["problems"]]
    assert any("40 events arrived after their packet was closed" in p for p in problems), problems
    assert report(tmp_path / "b")["hosts"][0]["problems"] == []  # the default gap (1 s) covers 10 ms


def test_path_hash_matches_the_vectorised_one():
    from vnet.analysis.stream import StreamJoin

    hops = [(0, 1, 2), (3,), (2, 1, 0, 4, 5), tuple(range(70)), (65536, 65537, 1)]
    flat = np.concatenate([np.array(h, np.uint32) for h in hops])
    sizes = np.array([len(h) for h in hops])
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    assert StreamJoin._path_hash(None, flat, starts, sizes).tolist() == [path_hash(h) for h in hops]


def test_order_by_packet_is_lexsort():
    rng = np.random.default_rng(7)
    for trial in range(200):
        n = int(rng.integers(2, 2000))
        ids = (rng.integers(0, 2**64, size=max(n // 4, 1), dtype=np.uint64) if trial % 3
               else rng.integers(0, 40, size=max(n // 4, 1)).astype(np.uint64))
        pid = ids[rng.integers(0, ids.size, size=n)]
        ts = np.sort(rng.integers(0, 10**6, size=n)).astype(np.int64)
        if trial % 2:  # hosts' pieces interleaved: a packet's events out of time order
            ts += rng.integers(-20_000, 20_000, size=n)
        order, p, t = order_by_packet(pid, ts)
        ref = np.lexsort((ts, pid))
        assert (order == ref).all() and (p == pid[ref]).all() and (t == ts[ref]).all(), trial


def test_scan_finds_clock_chunks_without_the_events(tmp_path):
    path = tmp_path / "t.vnt"
    w = TraceFileWriter(path, {"host": "a"})
    for i in range(50):
        w.write("events", seq=i, records=b"\0" * 4096, count=1)
        if i % 10 == 9:
            w.write("clock", seq=i, offset_ns=i, error_ns=100 - i)
    w.close()
    f = TraceFileReader(path)
    assert [c["offset_ns"] for c in f.scan(["clock"])] == [9, 19, 29, 39, 49]
    assert [c["seq"] for c in f.scan(["events"])][:3] == [0, 1, 2]
