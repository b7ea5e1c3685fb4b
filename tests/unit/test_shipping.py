"""Agent -> collector over the real protocol, in-process, no root: an events chunk's
records travel raw beside its head (from memory or from the disk spool) and land in
the trace file as the same chunk `vnet trace -w` writes; chunks that break the
envelope rules are refused with a reason."""

from __future__ import annotations

import time

import pytest

from vnet.agent.shipper import Shipper
from vnet.binding.ringbatch import pack_records, records
from vnet.collector.tracefile import TraceFileReader, TraceFileWriter
from vnet.protocol import MAX_DATA_BYTES, ProtocolError, connect

KEY = bytes(range(32))


@pytest.mark.parametrize("memory_bytes", [64 << 20, 0], ids=["in memory", "spooled"])
def test_records_arrive_raw_and_are_written_as_the_recorder_writes_them(collector, tmp_path, memory_bytes):
    col, address, out = collector
    small = pack_records([bytes([i]) * 40 for i in range(10)])          # packed into the chunk's msgpack
    large = pack_records([bytes([i % 251]) * 144 for i in range(2000)])  # written in place (>= 64 KiB)
    shipper = Shipper(address, KEY, {"trace": "t1", "host": "h1", "header": {"probes": []}},
                      spool_dir=tmp_path / "spool", memory_bytes=memory_bytes)
    try:
        shipper.put("events", count=10, records=memoryview(small))
        shipper.put("events", count=2000, records=memoryview(large))
        shipper.put("end", events=2010, chunks=2)
        assert shipper.flush(30)
        assert shipper.stats.spooled == (3 if memory_bytes == 0 else 0)
    finally:
        shipper.close()
    col.close()
    chunks = [c for c in TraceFileReader(out / "t1" / "h1.vnt").chunks() if c["kind"] != "clock"]
    assert [c["kind"] for c in chunks] == ["header", "events", "events", "end"]
    assert [list(c) for c in chunks[1:3]] == [["kind", "seq", "count", "records"]] * 2
    assert chunks[1]["records"] == small and chunks[2]["records"] == large
    assert [bytes(r) for r in records(chunks[2]["records"])] == [bytes([i % 251]) * 144 for i in range(2000)]
    assert chunks[3]["chunks"] == 2 and chunks[3]["events"] == 2010


@pytest.mark.parametrize("chunk, blob, why", [
    ({"kind": "events", "seq": 0, "count": 1}, None, "comes with its records"),
    ({"kind": "stats", "seq": 0}, b"x" * 16, "comes with its records"),
    ({"kind": "events", "seq": 1, "count": 1}, b"x" * 16, "does not match its envelope"),
    ({"kind": "events", "seq": 0, "count": 1, "records": b"x"}, b"x" * 16, "does not match its envelope"),
    ("not a map", None, "malformed chunk"),
])
def test_chunks_that_break_the_rules_are_refused(collector, caplog, chunk, blob, why):
    _, address, _ = collector
    ch = connect(address, KEY, "collector", limit=MAX_DATA_BYTES)
    ch.request({"type": "open", "trace": "t2", "host": "h1", "header": {}}, ("opened",))
    with caplog.at_level("WARNING", logger="vnet.protocol.server"):
        ch.send({"type": "chunk", "seq": 0, "chunk": chunk}, blob=blob)
        with pytest.raises((ConnectionError, OSError, ProtocolError)):
            while True:
                ch.recv(("ack", "ping"))
        deadline = time.monotonic() + 10
        while why not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.01)
    assert why in caplog.text
    ch.close()


def test_a_chunk_is_acknowledged_only_once_written_and_refused_when_it_cannot_be(collector, monkeypatch):
    """The collector verifies the next chunk while its writer thread writes the one before:
    an ack still means "on disk" (the agent forgets the chunk), a write that fails (a full
    disk here) is answered "full" and nothing after it is taken until it is sent again,
    and the chunks, 10 MB-class ones through the receive buffers in rotation, land in order."""
    import errno

    col, address, out = collector
    written: list[int] = []
    write_frame, failures = TraceFileWriter.write_frame, [3]

    def failing(self, frame, seq):
        if seq in failures:
            failures.remove(seq)
            raise OSError(errno.ENOSPC, "No space left on device")
        write_frame(self, frame, seq)
        written.append(seq)

    monkeypatch.setattr(TraceFileWriter, "write_frame", failing)
    ch = connect(address, KEY, "collector", limit=MAX_DATA_BYTES)
    ch.request({"type": "open", "trace": "t3", "host": "h1", "header": {}}, ("opened",))
    records = pack_records([bytes([i % 251]) * 144 for i in range(1000)])  # > 64 KiB: the receive buffers in rotation

    def send(seqs):
        for seq in seqs:
            ch.send({"type": "chunk", "seq": seq, "chunk": {"kind": "events", "seq": seq, "count": 1000}},
                    blob=records)

    def answers(n):
        got = []
        while len(got) < n:
            m = ch.recv(("ack", "full", "ping"))
            if m["type"] == "ack":
                assert m["seq"] in written  # written before it was acknowledged
            if m["type"] != "ping":
                got.append((m["type"], m.get("seq", m.get("have"))))
        return got

    send(range(6))
    assert answers(4) == [("ack", 0), ("ack", 1), ("ack", 2), ("full", 2)]  # 4 and 5: not taken, no answer
    send(range(3, 6))  # as the agent does after "full"
    assert answers(3) == [("ack", 3), ("ack", 4), ("ack", 5)]
    ch.send({"type": "close"})
    while ch.recv(("closed", "ping"))["type"] != "closed":
        pass
    ch.close()
    assert written == [0, 1, 2, 3, 4, 5]
    chunks = [c for c in TraceFileReader(out / "t3" / "h1.vnt").chunks() if c["kind"] not in ("clock", "header")]
    assert [(c["kind"], c["seq"]) for c in chunks] == [("events", n) for n in range(6)]
