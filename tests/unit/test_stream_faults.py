"""Faults on the collector's side, without root (the kernel tests in
tests/kernel/test_faults.py do the same with a real full tmpfs): a file size limit
(RLIMIT_FSIZE, a real EFBIG from the kernel) stops writes the way a full disk does;
the writer keeps the file readable up to its last whole chunk and carries on when
writes work again, also across a rotation whose new file could not take its header;
a collector refuses (does not acknowledge) what it could not write and writes it when
it is sent again; and what a host's files say was lost is reported (stream_accounting)."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
from unit_support import file_size_limit

from vnet.collector.server import Collector
from vnet.collector.tracefile import TraceFileReader, TraceFileWriter, stream_accounting
from vnet.protocol import MAX_DATA_BYTES, connect
from vnet.protocol.server import Server

KEY = bytes(range(32))


def _kinds(path) -> list[tuple[str, int]]:
    r = TraceFileReader(path)
    out = [(c["kind"], c["seq"]) for c in r.chunks()]
    assert not r.truncated, r.problem
    return out


def test_a_write_that_does_not_fit_leaves_the_file_whole_and_writing_resumes(tmp_path):
    path = tmp_path / "t.vnt"
    w = TraceFileWriter(path, {"host": "h"})
    w.write("events", seq=0, count=1, records=b"a" * 100)
    size = path.stat().st_size
    with file_size_limit(size + 50):
        with pytest.raises(OSError):
            w.write("events", seq=1, count=1, records=b"b" * 100)
        assert path.stat().st_size == size  # the torn chunk was cut off
        assert _kinds(path) == [("header", -1), ("events", 0)]
    w.write("events", seq=1, count=1, records=b"b" * 100)
    w.close()
    assert _kinds(path) == [("header", -1), ("events", 0), ("events", 1)]


def test_a_rotation_whose_header_did_not_fit_writes_it_before_the_next_chunk(tmp_path):
    path = tmp_path / "t.vnt"
    w = TraceFileWriter(path, {"host": "h", "pad": "x" * 200}, rotate_bytes=600)
    w.write("events", seq=0, count=1, records=b"a" * 200)
    with file_size_limit(100):  # the next file is created, its header does not fit
        with pytest.raises(OSError):
            w.write("events", seq=1, count=1, records=b"b" * 200)
    with pytest.raises(OSError), file_size_limit(100):
        w.write("events", seq=1, count=1, records=b"b" * 200)  # still not: nothing half-written
    w.write("events", seq=1, count=1, records=b"b" * 200)
    w.close()
    assert _kinds(path) == [("header", -1), ("events", 0)]
    assert _kinds(path.with_name("t.vnt.1")) == [("header", 0), ("events", 1)]


def test_the_collector_refuses_what_it_cannot_write_and_writes_it_when_sent_again(tmp_path):
    col = Collector(tmp_path / "out")
    srv = Server(f"unix:{tmp_path}/col.sock", KEY, "collector", col.handle, limit=MAX_DATA_BYTES)
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    ch = connect(f"unix:{tmp_path}/col.sock", KEY, "collector", limit=MAX_DATA_BYTES)
    try:
        opened = ch.request({"type": "open", "trace": "t", "host": "h", "run": "r1", "header": {}}, ("opened",))
        assert opened["have"] == -1

        def chunk(seq: int) -> dict:
            ch.send({"type": "chunk", "seq": seq, "chunk": {"kind": "events", "seq": seq, "count": 1}},
                    blob=b"x" * 4096)
            while True:
                m = ch.recv(("ack", "full", "ping"))
                if m["type"] != "ping":
                    return m

        assert chunk(0) == {"type": "ack", "seq": 0}
        size = (tmp_path / "out" / "t" / "h.vnt").stat().st_size
        with file_size_limit(size + 100):
            refused = chunk(1)
            assert refused["type"] == "full" and refused["have"] == 0 and refused["message"]
            ch.send({"type": "chunk", "seq": 2, "chunk": {"kind": "events", "seq": 2, "count": 1}}, blob=b"y")
        assert chunk(1) == {"type": "ack", "seq": 1}  # chunk 2 (sent during the refusal) was not taken ...
        assert chunk(2) == {"type": "ack", "seq": 2}  # ... and is written now, in order: no gap
        ch.send({"type": "close"})
        ch.recv(("closed", "ping"))
    finally:
        ch.close()
        srv.stop()
        thread.join(timeout=5)
    lines = col.close()
    assert "1 chunks refused and kept by the agent" in lines[0] and "STILL FAILING" not in lines[0], lines
    assert [k for k in _kinds(tmp_path / "out" / "t" / "h.vnt") if k[0] != "clock"] == [
        ("header", -1), ("events", 0), ("events", 1), ("events", 2)]


def test_what_a_hosts_files_say_was_lost_is_reported(tmp_path):
    def stream(name: str, run: str | None, *chunks: tuple) -> TraceFileReader:
        with TraceFileWriter(tmp_path / name, {"host": "h", **({"run": run} if run else {})}) as w:
            for kind, fields in chunks:
                w.write(kind, **fields)
        return TraceFileReader(tmp_path / name)

    whole = stream("a.vnt", "r1", ("events", {"seq": 0, "count": 1}),
                   ("end", {"seq": 1, "losses": {"kernel_ring_full": 0, "agent_unread": 0}}))
    assert stream_accounting([whole]) == []
    lossy = stream("b.vnt", "r2", ("events", {"seq": 0, "count": 1}), ("gap", {"first": 1, "last": 3}),
                   ("end", {"seq": 4, "losses": {"kernel_ring_full": 7, "agent_unread": 0}}))
    died = stream("c.vnt", "r3", ("events", {"seq": 0, "count": 1}),
                  ("interrupted", {"reason": "the agent ended without stopping this trace", "after": 0}))
    cut = stream("d.vnt", "r4", ("events", {"seq": 0, "count": 1}))
    recorded = stream("e.vnt", None, ("events", {"seq": 0, "count": 1}))  # vnet trace -w: its end is not ours
    found = stream_accounting([lossy, died, cut, recorded])
    assert found == ["run r2: chunks 1..3 never reached the collector (their events are missing and not counted)",
                     "run r2: events lost before the collector: kernel_ring_full 7",
                     "run r3: the agent died mid-trace after chunk 0: the agent ended without stopping this trace",
                     "run r4: no end record: the trace is still running, or its agent stopped without finishing "
                     "(killed, or cut off from the collector); what it had not shipped is missing"], found


def test_a_spool_write_that_fails_counts_as_the_spool_full(tmp_path, caplog):
    """Writes that fail half-way (EFBIG here, ENOSPC on a full disk: tests/kernel/test_faults.py)
    count as the spool full: each chunk's events counted, its half-written file gone, one log
    line for the whole episode; once a write succeeds again the status says so."""
    from vnet.agent.shipper import Shipper

    shipper = Shipper(f"unix:{tmp_path}/nobody.sock", KEY, {"trace": "t", "host": "h", "run": "r", "header": {}},
                      spool_dir=tmp_path / "spool", memory_bytes=0)
    try:
        shipper.put("events", count=3, records=b"a" * 100)
        with caplog.at_level("WARNING", logger="vnet.agent.shipper"), file_size_limit(50):
            for n in range(5, 25):
                shipper.put("events", count=n, records=b"b" * 100)
        assert shipper.stats.spooled == 1 and shipper.stats.dropped_events == sum(range(5, 25))
        assert shipper.stats.dropped_chunks == 20 and "File too large" in shipper.stats.spool_full
        assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["chunk-000000000000", "open"]
        said = [r.getMessage() for r in caplog.records if "spool full" in r.getMessage()]
        assert len(said) == 1 and "from chunk 1 on" in said[0] and "agent_spool_full" in said[0], said
        shipper.put("events", count=1, records=b"c" * 100)
        assert shipper.stats.spooled == 2 and shipper.stats.spool_full == ""
    finally:
        shipper.close()


def _allocated(path) -> int:
    import os

    return os.stat(path).st_blocks * 512


def test_the_queue_file_writes_new_pages_and_stores_into_the_ones_it_has(tmp_path, monkeypatch):
    """Pages the file does not have yet are written with pwritev (a full tmpfs says ENOSPC there,
    where a store is SIGBUS); once a queue that keeps up is back on pages it has written, its
    entries are stores through the mapping, no system call per chunk; after trim() the pages
    given back are written again."""
    import os as os_module

    from vnet.agent.queuefile import WORKING, QueueFile

    writes = []
    real = os_module.pwritev
    monkeypatch.setattr(os_module, "pwritev", lambda fd, parts, at: writes.append(at) or real(fd, parts, at))
    q = QueueFile.create(tmp_path / "queue", 8 * WORKING)
    chunk, live = b"k" * (WORKING // 4), []
    for seq in range(40):  # ten laps of the working bytes, two entries queued at a time
        live.append(q.append(seq, b"h", chunk, None))
        if len(live) > 1:
            q.release(live.pop(0))
    first_lap = len(writes)
    assert 3 <= first_lap <= 6 and q._touched <= WORKING + len(chunk) + 4096, writes  # then stores only
    for seq in range(40, 60):  # a backlog past the working bytes: new pages, written
        live.append(q.append(seq, b"h", chunk, None))
    assert len(writes) > first_lap + 10
    for slot in live:
        assert bytes(q.read(slot)[1]) == chunk
    q.release(live[-1])
    assert q.trim() and q._touched == WORKING
    before = len(writes)
    live = [q.append(seq, b"h", chunk, None) for seq in range(60, 66)]  # past WORKING again: written
    assert len(writes) > before and all(bytes(q.read(slot)[1]) == chunk for slot in live)
    q.close()


def test_a_backlogs_queue_memory_goes_back_after_a_quiet_second_a_step_at_a_time(tmp_path, monkeypatch):
    """Once a backlog is acknowledged the queue file keeps its pages for TRIM_IDLE_S (a burst
    that comes back finds them; the last ack is not held up by freeing them), then the
    shipper's thread gives them back TRIM_STEP_BYTES at a time (the ring's reader waits for
    one step, not all), down to the working bytes, and then the heap's free memory. A chunk
    queued meanwhile puts it off. (Acks come from _ack here, as from the collector.)"""
    from vnet.agent import shipper as shipping
    from vnet.agent.queuefile import WORKING

    monkeypatch.setattr(shipping, "TRIM_STEP_BYTES", 4 << 20)
    s = shipping.Shipper(f"unix:{tmp_path}/nobody.sock", KEY, {"trace": "t", "host": "h", "run": "r", "header": {}},
                         spool_dir=tmp_path / "spool", memory_bytes=64 << 20, queue_dir=tmp_path / "q")
    qpath = tmp_path / "q" / "queue"
    try:
        for i in range(6):  # 24 MiB: past TRIM_AFTER_BYTES
            s.put("events", count=1, records=bytes([i]) * (4 << 20))
        assert s.stats.queued == 6 and s.stats.spooled == 0 and _allocated(qpath) >= 24 << 20
        with s._cond:
            s._ack(5)
            assert s._trim_at is not None and s._trim_step() is None  # not yet: kept a while
            assert _allocated(qpath) >= 24 << 20
            s._trim_at = time.monotonic() - 1
            s.put("events", count=1, records=b"x" * 100)  # busy again: put off
            assert s._trim_step() is None and s._trim_at > time.monotonic()
            s._ack(6)
            s._trim_at = time.monotonic() - 1
            steps = []
            while (step := s._trim_step()) == "file":
                steps.append(_allocated(qpath))
            assert step == "heap" and s._trim_at is None and s._high == 0
        assert len(steps) >= 4 and steps == sorted(steps, reverse=True) and steps[0] >= 20 << 20
        assert _allocated(qpath) <= 4096 + WORKING
    finally:
        s.close()


def _recover_and_deliver(run_dir) -> None:
    """What the next agent start does with a dead agent's spool folder: resend it all, have
    the interruption recorded; then the folder goes."""
    from vnet.agent.shipper import Shipper

    again = Shipper.recover(run_dir, KEY)
    deadline = time.monotonic() + 20
    while not again.done and time.monotonic() < deadline:
        time.sleep(0.05)
    assert again.done
    again.close()
    assert not run_dir.exists()  # delivered: the folder goes


def test_a_half_written_spool_file_is_never_resent(tmp_path, collector):
    """A chunk's .tmp (an agent killed during a spool write) is not a chunk: the next agent
    deletes it and sends only the whole ones."""
    from vnet.agent.shipper import Shipper

    col, address, out = collector
    run_dir = tmp_path / "spool" / "t" / "h" / "r1"
    dead = Shipper(address, KEY, {"trace": "t", "host": "h", "run": "r1", "header": {}}, spool_dir=run_dir,
                   memory_bytes=0)
    dead._stop.set()  # as if killed before it shipped anything
    dead._thread.join(timeout=5)
    dead.put("events", count=1, records=b"a" * 50)
    (run_dir / "chunk-000000000001.tmp").write_bytes(b"\0\0\0\x09half")
    _recover_and_deliver(run_dir)
    assert [k for k in _kinds(out / "t" / "h.vnt") if k[0] != "clock"] == [("header", -1), ("events", 0),
                                                                            ("interrupted", 0)]


def test_a_dead_agents_spool_is_resent_and_the_interruption_recorded(tmp_path, collector):
    from vnet.agent.shipper import Shipper

    col, address, out = collector
    run_dir = tmp_path / "spool" / "t" / "h" / "r1"
    dead = Shipper(f"unix:{tmp_path}/nobody.sock", KEY, {"trace": "t", "host": "h", "run": "r1", "header": {}},
                   spool_dir=run_dir, memory_bytes=0)
    for i in range(3):
        dead.put("events", count=1, records=bytes([i]) * 50)
    dead._stop.set()  # as if killed: no close(), the spool stays as it is
    dead._thread.join(timeout=5)
    saved = msgpack.unpackb((run_dir / "open").read_bytes(), raw=False)
    saved["address"] = address  # the collector it was shipping to
    (run_dir / "open").write_bytes(msgpack.packb(saved, use_bin_type=True))

    _recover_and_deliver(run_dir)
    kinds = [k for k in _kinds(out / "t" / "h.vnt") if k[0] != "clock"]
    assert kinds == [("header", -1), ("events", 0), ("events", 1), ("events", 2), ("interrupted", 2)]


def test_a_dead_agents_memory_queue_file_is_resent_and_removed(tmp_path, collector):
    """The memory queue as a mapped file (--queue-dir): what a killed shipper held in
    "memory" is there for the next start, sent in order with what went to the spool past
    the bound, each once (a chunk in both places too: killed while spooling it); the chunks'
    ring positions stay local (never shipped); the file and the folders go."""
    from vnet.agent.queuefile import QueueFile
    from vnet.agent.shipper import Shipper

    col, address, out = collector
    run_dir, queue = tmp_path / "spool" / "t" / "h" / "r1", tmp_path / "queue" / "t" / "h" / "r1"
    dead = Shipper(f"unix:{tmp_path}/nobody.sock", KEY, {"trace": "t", "host": "h", "run": "r1", "header": {}},
                   spool_dir=run_dir, memory_bytes=200, queue_dir=queue)
    for i in range(5):  # ~90 bytes each: two in the queue file, the rest spooled
        dead.put("events", memoryview(bytes([i]) * 64), count=1, ring_end=64 * (i + 1))
    dead._stop.set()  # as if killed: no close()
    dead._thread.join(timeout=5)
    slots = QueueFile.open(queue / "queue").entries()
    assert [(s.seq, s.ring_end) for s in slots] == [(0, 64), (1, 128)]
    assert sorted(p.name for p in run_dir.iterdir()) == ["chunk-000000000002", "chunk-000000000003",
                                                         "chunk-000000000004", "open"]
    assert dead.stats.spooled == 3 and dead.stats.dropped_chunks == 0
    dead._write(dead._queue[0], *dead._queue[0].load(dead._qfile), run_dir)  # and chunk 0 half-way to the spool
    saved = msgpack.unpackb((run_dir / "open").read_bytes(), raw=False)
    assert saved["queue_dir"] == str(queue)
    saved["address"] = address
    (run_dir / "open").write_bytes(msgpack.packb(saved, use_bin_type=True))

    _recover_and_deliver(run_dir)
    assert not queue.exists()
    r = TraceFileReader(out / "t" / "h.vnt")
    events = [c for c in r.chunks() if c["kind"] == "events"]
    assert [c["seq"] for c in events] == [0, 1, 2, 3, 4] and all("_local" not in c for c in events)
    assert [bytes(c["records"]) for c in events] == [bytes([i]) * 64 for i in range(5)]


def test_the_queue_file_wraps_keeps_up_in_its_first_pages_and_refuses_what_does_not_fit(tmp_path):
    """Pure logic of vnet/agent/queuefile.py on a real file: entries appended and released
    in order across the end of the area, read back whole; an empty queue starts again at the
    area's beginning; a full one refuses; a reader of the file finds what is queued."""
    from vnet.agent.queuefile import HEADER, WORKING, QueueFile

    q = QueueFile.create(tmp_path / "queue", 4096)
    a = q.append(0, b"h0", b"x" * 1500, 10)
    b = q.append(1, b"h1", b"y" * 1500, 20)
    assert q.append(2, b"h2", b"z" * 1500, 30) is None  # 3 x ~1.5 KiB do not fit 4 KiB
    q.release(a)
    c = q.append(2, b"h2", b"z" * 1500, 30)  # past the end: the next lap, where `a` was
    assert c.pos == 4096 and c.end - c.pos < 1600
    assert [(s.seq, s.ring_end) for s in QueueFile.open(tmp_path / "queue").entries()] == [(1, 20), (2, 30)]
    head, records = q.read(c)
    assert bytes(head) == b"h2" and bytes(records) == b"z" * 1500
    q.release(b)
    q.release(c)
    d = q.append(3, b"h3", None, None)  # empty: from the area's start again
    assert d.pos % 4096 == 0 and q.read(d)[1] is None
    assert q.append(4, b"h4", b"w" * 5000, None) is None  # larger than the area
    q.close()
    assert (tmp_path / "queue").stat().st_size == HEADER + 4096

    # a queue that keeps up (a chunk or two unacknowledged) stays in the working bytes of a
    # larger area; a backlog spreads over it, and trim() gives it back once empty
    q = QueueFile.create(tmp_path / "big", 16 * WORKING)
    chunk, live = b"c" * (WORKING // 5), []
    for seq in range(50):
        live.append(q.append(seq, b"h", chunk, None))
        if len(live) > 2:
            q.release(live.pop(0))
    assert max(s.pos % q.size for s in live) < WORKING and q._touched <= WORKING + len(chunk) + 4096
    for seq in range(50, 100):
        live.append(q.append(seq, b"h", chunk, None))
    assert q._touched > 8 * WORKING and not q.trim()  # not empty yet
    q.release(live[-1])
    top, held = q._written, _allocated(tmp_path / "big")
    assert q.trim(most=3 * 4096 + 5) and q._written == q._touched == top - 3 * 4096  # a step, from the top
    assert _allocated(tmp_path / "big") == held - 3 * 4096
    assert q.trim() and q._written == q._touched == WORKING and not q.trim()
    assert _allocated(tmp_path / "big") <= HEADER + WORKING  # the file system has the pages back
    q.close()

    # chunks larger than the working bytes (an agent's 10 MB at high rates), a few unacknowledged:
    # all in the area, one after the other (they once went to the spool every other chunk: the
    # jump back to the beginning left the rest of the area unused behind the queued ones)
    q = QueueFile.create(tmp_path / "large", 32 * WORKING)
    chunk, live = b"L" * (WORKING * 5 // 2), []
    for seq in range(60):
        slot = q.append(seq, b"h", chunk, None)
        assert slot is not None, (seq, [s.pos for s in live])
        live.append(slot)
        if seq % 4 == 3:  # acknowledged in bursts: up to 4 queued
            while len(live) > 1:
                q.release(live.pop(0))
    q.close()


def test_a_collector_that_cannot_create_the_file_says_why_and_leaves_none(tmp_path, collector):
    from vnet.protocol import ProtocolError

    _, address, out = collector
    ch = connect(address, KEY, "collector", limit=MAX_DATA_BYTES)
    try:
        with file_size_limit(10), pytest.raises(ProtocolError, match="cannot create .*h.vnt: File too large"):
            ch.request({"type": "open", "trace": "t", "host": "h", "run": "r1", "header": {}}, ("opened",))
    finally:
        ch.close()
    assert list((out / "t").iterdir()) == []  # no empty file left for a reader to stumble on
    ch = connect(address, KEY, "collector", limit=MAX_DATA_BYTES)
    try:  # and once writing works, the same stream opens
        assert ch.request({"type": "open", "trace": "t", "host": "h", "run": "r1", "header": {}},
                          ("opened",))["have"] == -1
    finally:
        ch.close()


def test_a_queue_that_kept_up_holds_its_whole_area_when_the_collector_stalls(tmp_path):
    """Pure logic of vnet/agent/queuefile.py on a real file. A queue keeping up jumps back to its
    first pages; a stall right after such a jump once left it room for ~1 MiB of a 64 MiB area (the
    entries still queued in the lap before were in the way) and the rest went to the disk spool.
    It now goes on past them: whatever the moment of the stall, nearly the whole area fills."""
    from vnet.agent.queuefile import QueueFile

    least = None
    for before in range(20, 60):
        q = QueueFile.create(tmp_path / f"q{before}", 64 << 20)
        chunk, live = b"c" * (1 << 20), []
        for seq in range(before):  # keeping up: one or two chunks queued
            live.append(q.append(seq, b"h", chunk, None))
            if len(live) > 2:
                q.release(live.pop(0))
        n = 0  # the collector stops acknowledging
        while q.append(1000 + n, b"h", chunk, None) is not None:
            n += 1
        assert [s.seq for s in QueueFile.open(q.path).entries()] == [s.seq for s in live] + list(range(1000, 1000 + n))
        least = n if least is None else min(least, n)
        q.close()
    assert least >= 60, least  # MiB of the 64, in every case (was 1)


@pytest.mark.parametrize("seed", range(6))
def test_the_queue_file_keeps_every_entry_whole_through_random_appends_and_acks(tmp_path, seed):
    """Pure logic on a real file: random entry sizes (bytes to 5 MiB), acknowledgements that come
    in bursts or stall, and an entry being sent below tail (floor): every queued entry reads back
    as written, a successor's walk (entries()) finds exactly the queued ones in order, and the
    queue counts exactly their bytes when nothing wrapped or skipped in between."""
    import random

    from vnet.agent.queuefile import QueueFile

    rng = random.Random(seed)
    q = QueueFile.create(tmp_path / "q", 16 << 20)
    live, refused = [], 0
    for seq in range(3000):
        size = rng.choice([0, 100, 5000, 300_000, 1 << 20, 5 << 20])
        data = bytes([seq % 251]) * size
        floor = live[0].pos if live and rng.random() < 0.2 else None
        slot = q.append(seq, f"h{seq}".encode(), data or None, seq, floor)
        if slot is None:
            refused += 1
        else:
            live.append(slot)
        mode = rng.random()
        if mode < 0.3:  # a burst of acks
            for _ in range(rng.randint(1, 4)):
                if live:
                    q.release(live.pop(0))
        elif mode < 0.35 and live:  # everything
            q.release(live[-1])
            live.clear()
        if seq % 50 == 0 or slot is None:
            for s in live:
                head, records = q.read(s)
                assert bytes(head) == f"h{s.seq}".encode(), s
                assert (bytes(records) if records is not None else b"") == bytes([s.seq % 251]) * len(
                    records if records is not None else b""), s
            assert [(s.seq, s.pos) for s in QueueFile.open(q.path).entries()] == [(s.seq, s.pos) for s in live]
    assert 0 < refused < 3000
    q.close()
