"""The collector's bound on streams (issue 11: a key holder cannot exhaust it). A real
collector in this process on a unix socket, real authenticated connections, a real
Shipper: streams not ended by their agent each hold a file open, at most max_streams
of them; past it a new stream is refused with the reason, counted, and its agent keeps
its chunks and delivers them once a stream ends. Ended streams are forgotten (their
summary lines kept), so a long-running collector serves any number of runs."""

from __future__ import annotations

import contextlib
import os
import time

import pytest

from vnet.protocol import MAX_DATA_BYTES, ProtocolError, connect

KEY = bytes(range(32))


@pytest.fixture
def small_collector(tmp_path, serve_collector):
    """A collector that keeps at most 3 streams open: (collector, address, out)."""
    with serve_collector(tmp_path, max_streams=3) as served:
        yield served


def _open(address: str, host: str, run: str = "r1"):
    ch = connect(address, KEY, "collector", limit=MAX_DATA_BYTES)
    try:
        ch.request({"type": "open", "trace": "t", "host": host, "run": run, "header": {}}, ("opened",))
    except BaseException:
        ch.close()
        raise
    return ch


def _end(ch) -> None:
    """What an agent does at the end of its stream: close, wait for "closed" (past the clock's pings)."""
    try:
        ch.send({"type": "close"})
        while ch.recv(("closed", "ping"))["type"] == "ping":
            pass
    finally:
        ch.close()


def _wait(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_past_the_limit_a_new_stream_is_refused_with_the_reason_and_counted(small_collector):
    col, address, _ = small_collector
    held = [_open(address, f"h{i}") for i in range(3)]
    try:
        with pytest.raises(ProtocolError, match=r"refuses a new stream: 3 streams are open.*--max-streams"):
            _open(address, "h3")
        assert col.refused_streams == 1
        # a stream already open is not a new one: its agent reconnecting is served
        held[0].close()
        _wait(lambda: col.streams[("t", "h0", "r1")].connections == 0)
        held[0] = _open(address, "h0")
        # an ended stream frees its place
        _end(held.pop())
        assert _wait(lambda: len(col.streams) == 2)
        held.append(_open(address, "h3"))
    finally:
        for ch in held:
            ch.close()
    assert any("refused 1 new streams" in line for line in col.close())


def test_a_cut_off_stream_keeps_its_place_so_open_files_stay_bounded(small_collector):
    """Streams whose connection went without an end may be resumed: they stay, each with
    its file open, and count against the limit: the collector's descriptors stay bounded
    however many streams a peer tries to open and drop."""
    col, address, out = small_collector

    def files_open() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                n += os.readlink(f"/proc/self/fd/{fd}").startswith(str(out))
        return n

    for i in range(30):
        try:
            _open(address, f"h{i}").close()  # dropped, not ended
        except ProtocolError:
            pass
    assert _wait(lambda: sum(st.connections for st in col.streams.values()) == 0)
    assert len(col.streams) == 3 and col.refused_streams == 27
    assert files_open() == 3


def test_ended_streams_are_forgotten_so_any_number_of_runs_is_served(small_collector):
    col, address, out = small_collector
    for i in range(20):
        _end(_open(address, "h", run=f"r{i}"))
    assert _wait(lambda: not col.streams) and col.refused_streams == 0
    assert len(list((out / "t").glob("h.vnt*"))) == 20
    lines = col.close()
    assert len(lines) == 20 and all(line.startswith("t/h: 0 chunks") for line in lines)


def test_an_agent_refused_keeps_its_chunks_and_delivers_them_once_a_place_frees(small_collector, tmp_path):
    from vnet.agent.shipper import Shipper

    col, address, out = small_collector
    held = [_open(address, f"h{i}") for i in range(3)]
    shipper = Shipper(address, KEY, {"trace": "t", "host": "late", "run": "r1", "header": {}},
                      spool_dir=tmp_path / "spool", memory_bytes=1 << 20)
    try:
        for i in range(5):
            shipper.put("events", count=2, records=bytes([i]) * 64)
        assert _wait(lambda: col.refused_streams >= 1)
        assert shipper.stats.acked < 0 and shipper.stats.queued == 5  # refused: kept, nothing lost
        assert "refuses a new stream" in shipper.stats.last_error
        _end(held.pop())
        assert _wait(lambda: shipper.stats.acked == 4, timeout=30)  # retried (back-off), then delivered
    finally:
        shipper.close()
        for ch in held:
            ch.close()
    st = col.streams.get(("t", "late", "r1"))
    lines = col.close()
    assert st is None or st.events == 10
    assert any(line.startswith("t/late: 5 chunks, 10 events") for line in lines), lines


def test_only_pongs_answering_a_recent_ping_become_clock_samples(tmp_path):
    """A key holder's junk pongs (found by the collector fuzz: a value past int64 reached the
    file and crashed `vnet analyze`) leave no clock sample; a real answer does."""
    from vnet.collector.server import Collector
    from vnet.collector.tracefile import TraceFileReader

    col = Collector(tmp_path / "out")
    st = col._stream("t", "h", "r1", {"host": "h"})
    st.open()
    now = time.monotonic_ns()
    for junk in ({"t": now - 1000, "mono_ns": 1 << 63}, {"t": now - 1000, "mono_ns": -(1 << 62)},
                 {"t": now - 61_000_000_000, "mono_ns": 5}, {"t": now + 10**12, "mono_ns": 5},
                 {"t": "x", "mono_ns": 5}, {"t": now - 1000}):
        col._clock(st, junk)
    col._clock(st, {"t": now - 1000, "mono_ns": 12345})
    col.close()
    clocks = [c for c in TraceFileReader(st.path).chunks(["clock"])]
    assert len(clocks) == 1 and clocks[0]["agent_mono_ns"] == 12345


def test_a_stream_nobody_sends_to_gives_its_write_stage_back(tmp_path, serve_collector):
    """Direct writes stage each chunk (it grows to the largest): a stream whose connection
    went without an end keeps its file open, not the large stage."""
    from vnet.collector.tracefile import STAGE_KEPT

    with serve_collector(tmp_path) as (col, address, out):
        ch = connect(address, KEY, "collector", limit=MAX_DATA_BYTES)
        ch.request({"type": "open", "trace": "t", "host": "h", "run": "r1", "header": {}}, ("opened",))
        ch.send({"type": "chunk", "seq": 0, "chunk": {"kind": "events", "seq": 0, "count": 1}}, blob=b"x" * (3 << 20))
        while ch.recv(("ack", "ping"))["type"] != "ack":
            pass
        (st,) = col.streams.values()
        if not st.writer.direct_io:
            pytest.skip("no direct I/O on this file system")
        assert len(st.writer._direct._stage) > 3 << 20
        ch.close()  # dropped, not ended
        assert _wait(lambda: st.connections == 0)
        assert _wait(lambda: len(st.writer._direct._stage) == STAGE_KEPT)
