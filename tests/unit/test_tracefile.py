"""The trace file format (pure logic: synthetic records, laid out by the real
object's BTF; no kernel): round trips, rotation, and what a reader does with
torn, corrupt, oversized and newer files."""

import ipaddress
import os
import struct
import tracemalloc
import zlib

import msgpack
import pytest
from unit_support import file_size_limit

from vnet.binding import Btf
from vnet.binding.ringbatch import pack_records
from vnet.collector import tracefile
from vnet.collector.tracefile import (FORMAT_VERSION, FRAME, MAGIC, MAX_CHUNK_BYTES, PREAMBLE, TraceFileReader,
                                      TraceFileWriter, abi_from_btf, decode_events, labels_to_list,
                                      layout_from_dict, layout_to_dict, rotated_paths)
from vnet.errors import UsageError
from vnet.objects import object_path
from vnet.trace.records import EventDecoder

WALL_OFFSET = 1_700_000_000_000_000_000
LABELS = {(0, 1): {"probe": "dev:ns1/veth0:ingress", "ifname": "veth0", "netns": "ns1", "layer": "device"},
          (1, None): {"probe": "net:netif_receive_skb", "layer": "stack"}}


@pytest.fixture(scope="module")
def btf():
    with Btf.from_file(str(object_path("tc_trace"))) as b:
        yield b


@pytest.fixture(scope="module")
def header(btf):
    return {"trace": "t1", "host": "hv1", "kernel": "6.1.0", "abi": abi_from_btf(btf),
            "probes": [{"probe": "dev:ns1/veth0:ingress", "hook": "tcx"}], "labels": labels_to_list(LABELS),
            "filter": {"proto": "udp"}, "clock": {"wall_offset_ns": WALL_OFFSET},
            "ifnames": [[0xC00C, 7, "eth7", None]], "drop_reasons": [[2, "NOT_SPECIFIED"]]}


def event(btf, i: int, **fields) -> bytes:
    """A packet record: struct vnet_event, or struct vnet_event_more (VNET_KIND_PACKET_MORE)
    where a field only that one has is given, as the programs write them."""
    flags = btf.enum("vnet_event_flag")
    base = {"ts_ns": 1000 + i, "pkt_id": 0xABC000 + i, "probe_id": 0, "ifindex": 3, "len": 60 + i,
            "hook": btf.enum("vnet_hook")["VNET_HOOK_TC_INGRESS"], "eth_proto": 0x0800, "cpu": 1, "l4_proto": 17,
            "sport": 1000 + i, "dport": 53, "ttl": 64, "ip_id": i,
            "kind": btf.enum("vnet_event_kind")["VNET_KIND_PACKET"],
            "flags": flags["VNET_F_IPV4"] | flags["VNET_F_PORTS"],
            "saddr": ipaddress.IPv4Address("10.0.0.1").packed, "daddr": ipaddress.IPv4Address("10.0.0.2").packed}
    base.update(fields)
    if set(base) <= set(btf.struct("vnet_event").names):
        return btf.struct("vnet_event").encode(base)
    base["kind"] = btf.enum("vnet_event_kind")["VNET_KIND_PACKET_MORE"]
    return btf.struct("vnet_event_more").encode(base)


def sched_event(btf, i: int) -> bytes:
    return btf.struct("vnet_sched_event").encode({
        "ts_ns": 5000 + i, "probe_id": 1, "kind": btf.enum("vnet_event_kind")["VNET_KIND_SCHED"], "cpu": 0,
        "runq_ns": 1234, "pid": 42, "tgid": 42, "prev_pid": 7, "comm": b"qemu-kvm", "prev_comm": b"swapper"})


def write_file(path, header, chunks, **kw):
    with TraceFileWriter(path, header, **kw) as w:
        for kind, fields in chunks:
            w.write(kind, **fields)
    return w


def small_file(tmp_path, btf) -> tuple[bytes, list[int]]:
    """A small trace file's bytes and the offset where each chunk ends."""
    path = tmp_path / "small.vnt"
    blob = pack_records([event(btf, i) for i in range(2)])
    write_file(path, {"trace": "s"}, [("events", {"seq": 0, "records": blob, "count": 2}),
                                      ("stats", {"seq": 1, "per_cpu": [[1, 1, 0, 0]]}),
                                      ("end", {"seq": 2, "losses": {}})])
    data = path.read_bytes()
    ends, pos = [], PREAMBLE.size
    while pos < len(data):
        pos += FRAME.size + FRAME.unpack_from(data, pos)[0]
        ends.append(pos)
    return data, ends


# -- round trips ------------------------------------------------------------------------------------------

def test_chunks_and_events_round_trip(tmp_path, btf, header):
    raws = [event(btf, i) for i in range(5)] + [sched_event(btf, 0)] + [event(btf, 9, probe_id=1, ifindex=7,
                                                                              netns_cookie=0xC00C, reason=2)]
    blob = pack_records(raws)
    path = tmp_path / "t.vnt"
    write_file(path, header, [("events", {"seq": 0, "records": blob, "count": len(raws)}),
                              ("stats", {"seq": 1, "per_cpu": [[10, 7, 0, 3], [0, 0, 0, 0]]}),
                              ("gap", {"first": 2, "last": 4}),
                              ("clock", {"offset_ns": -5, "error_ns": 20}),
                              ("end", {"seq": 5, "losses": {"kernel_ring_full": 0}})])
    r = TraceFileReader(path)
    assert r.version == FORMAT_VERSION
    assert r.header["kind"] == "header" and r.header["format"] == FORMAT_VERSION and r.header["part"] == 0
    assert r.header["seq"] == -1 and r.header["trace"] == "t1" and r.header["filter"] == {"proto": "udp"}
    chunks = list(r.chunks())
    assert [(c["kind"], c["seq"]) for c in chunks] == [("header", -1), ("events", 0), ("stats", 1), ("gap", 1),
                                                       ("clock", 1), ("end", 5)]
    assert chunks[3]["first"] == 2 and chunks[1]["records"] == blob and not r.truncated and r.problem is None

    # Decoded from the header alone, exactly as the live decoder with the object's BTF would.
    enums = {n: btf.enum(n) for n in ("vnet_hook", "vnet_event_flag", "vnet_event_kind")}
    names = type("Names", (), {"lookup": lambda self, c, i: ("eth7", None) if (c, i) == (0xC00C, 7) else (None, None)})
    live = EventDecoder(btf.struct("vnet_event"), enums, LABELS, WALL_OFFSET, ifnames=names(),
                        drop_reasons={2: "NOT_SPECIFIED"}, sched_layout=btf.struct("vnet_sched_event"),
                        more_layout=btf.struct("vnet_event_more"))
    want = [live.decode(raw) for raw in raws]
    assert decode_events(r.header, blob) == want == list(r.events())
    assert want[0]["probe"] == "dev:ns1/veth0:ingress" and want[0]["wall_ns"] == WALL_OFFSET + 1000
    assert want[5]["kind"] == "sched" and want[5]["comm"] == "qemu-kvm"
    assert (want[6]["ifname"], want[6]["reason"], want[6]["probe"]) == ("eth7", "NOT_SPECIFIED",
                                                                       "net:netif_receive_skb")


def test_layouts_round_trip_and_bad_ones_are_refused(btf):
    layout = btf.struct("vnet_event")
    d = msgpack.unpackb(msgpack.packb(layout_to_dict(layout)))
    back = layout_from_dict(d)
    assert (back.name, back.size, back.fields) == (layout.name, layout.size, layout.fields)
    for bad in (dict(d, size=d["size"] - 8), dict(d, fields=d["fields"][::-1]),
                dict(d, fields=[dict(d["fields"][0], size=3)] + d["fields"][1:])):
        with pytest.raises(UsageError, match="bad record layout"):
            layout_from_dict(bad)
    with pytest.raises(UsageError, match="bad record layout"):
        layout_from_dict({"name": "x", "size": 4, "fields": [{"name": "a", "offset": 0, "size": 4, "fmt": "?!"}]})
    with pytest.raises(UsageError, match="no record layout"):
        decode_events({"kind": "header"}, b"")


def test_unknown_kinds_and_unreadable_chunks_are_skipped(tmp_path, btf, header):
    path = tmp_path / "t.vnt"
    blob = pack_records([event(btf, 1)])
    write_file(path, header, [("hologram", {"seq": 0, "x": 1}), ("events", {"seq": 1, "records": blob, "count": 1})])
    with open(path, "ab") as f:  # a whole frame (good crc) whose payload is no chunk, then a good chunk
        for payload in (b"\xc1", msgpack.packb([1, 2]),
                        msgpack.packb({"kind": "events", "seq": 2, "records": blob, "count": 1})):
            f.write(FRAME.pack(len(payload), zlib.crc32(payload)) + payload)
    r = TraceFileReader(path)
    assert [c["kind"] for c in r.chunks()] == ["header", "hologram", "events", "events"]
    assert r.skipped == 2 and not r.truncated
    assert [e["ip_id"] for e in r.events()] == [1, 1]
    assert [c["seq"] for c in r.chunks(kinds=["events"])] == [1, 2]


def test_rotation_starts_every_file_with_the_header(tmp_path, btf, header):
    path = tmp_path / "r.vnt"
    blob = pack_records([event(btf, i) for i in range(20)])  # ~3 KiB a chunk
    w = write_file(path, header, [("events", {"seq": s, "records": blob, "count": 20}) for s in range(10)],
                   rotate_bytes=8 << 10)
    paths = rotated_paths(path)
    assert paths == w.paths and len(paths) > 2 and paths[1].name == "r.vnt.1"
    seqs = []
    for part, p in enumerate(paths):
        r = TraceFileReader(p)
        chunks = list(r.chunks())
        assert chunks[0]["kind"] == "header" and chunks[0]["part"] == part and chunks[0]["trace"] == "t1"
        assert chunks[0]["seq"] == (seqs[-1] if seqs else -1)  # where in the stream this file starts
        assert p.stat().st_size <= 8 << 10
        seqs += [c["seq"] for c in chunks[1:]]
    assert seqs == list(range(10))


def test_an_existing_trace_is_never_overwritten(tmp_path, header):
    path = tmp_path / "t.vnt"
    path.write_bytes(b"precious")
    with pytest.raises(UsageError, match="already exists"):
        TraceFileWriter(path, header)
    assert path.read_bytes() == b"precious"


def test_a_failed_write_leaves_no_torn_chunk_behind(tmp_path, btf, header, monkeypatch):
    """Disk full halfway through a chunk: the part written is cut off again, so
    the chunks written after it (once there is room) are still reachable."""
    path = tmp_path / "t.vnt"
    w = TraceFileWriter(path, header)
    w.write("events", seq=0, records=pack_records([event(btf, 0)]), count=1)
    real_writev = os.writev
    calls = []

    def write_half_then_fail(fd, buffers):
        data = b"".join(bytes(b) for b in buffers)
        calls.append(len(data))
        if len(calls) == 1:
            return os.write(fd, data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracefile.os, "writev", write_half_then_fail)
    with pytest.raises(OSError):
        w.write("events", seq=1, records=pack_records([event(btf, 1)]), count=1)
    monkeypatch.setattr(tracefile.os, "writev", real_writev)
    w.write("events", seq=2, records=pack_records([event(btf, 2)]), count=1)
    w.close()
    r = TraceFileReader(path)
    assert [c["seq"] for c in r.chunks(["events"])] == [0, 2] and not r.truncated


@pytest.mark.parametrize("nbytes", [0, 100, (1 << 16) - 1, 1 << 16, 10 << 20])
def test_large_records_are_written_in_place_with_packbs_bytes(tmp_path, header, nbytes, monkeypatch):
    """An events chunk's records go from where they are (writev, no copy into the
    chunk), in pieces if the kernel takes them so: the file holds exactly the
    bytes of msgpack.packb and one frame, as before."""
    records = bytes(range(256)) * (nbytes // 256) + bytes(nbytes % 256)
    real_writev = os.writev

    def a_little_at_a_time(fd, buffers):  # regular files may take less than asked (a signal)
        return real_writev(fd, [memoryview(b)[:4099] for b in buffers[:2]])

    monkeypatch.setattr(tracefile.os, "writev", a_little_at_a_time)
    path = tmp_path / "t.vnt"
    with TraceFileWriter(path, header) as w:
        before = w._size
        w.write("events", seq=3, count=7, records=records)
    payload = msgpack.packb({"kind": "events", "seq": 3, "count": 7, "records": records}, use_bin_type=True)
    assert path.read_bytes()[before:] == FRAME.pack(len(payload), zlib.crc32(payload)) + payload
    (chunk,) = TraceFileReader(path).chunks(["events"])
    assert chunk["records"] == records


def test_writing_after_close_is_an_error(tmp_path, header):
    w = TraceFileWriter(tmp_path / "t.vnt", header)
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError):
        w.write("end")


# -- damaged files ----------------------------------------------------------------------------------------

def test_every_prefix_reads_its_complete_chunks_only(tmp_path, btf):
    data, ends = small_file(tmp_path, btf)
    path = tmp_path / "prefix.vnt"
    for n in range(len(data) + 1):
        path.write_bytes(data[:n])
        r = TraceFileReader(path)
        complete = [e for e in ends if e <= n]
        if not complete:  # not even the header: nothing to read, and it says so
            assert r.header is None and r.truncated and list(r.chunks()) == [], n
            continue
        got = list(r.chunks())
        assert len(got) == len(complete), n
        assert r.header["trace"] == "s"
        boundary = complete[-1]
        assert r.truncated == (n != boundary), n
        assert r.ignored_bytes == n - boundary, n
        if r.truncated:
            assert "cut short" in r.problem
    assert [c["kind"] for c in got] == ["header", "events", "stats", "end"]


def test_a_checksum_mismatch_stops_reading_there(tmp_path, btf):
    data, ends = small_file(tmp_path, btf)
    path = tmp_path / "crc.vnt"
    for chunk, kinds in ((3, ["header", "events", "stats"]), (1, ["header"])):
        bad = bytearray(data)
        bad[ends[chunk] - 1] ^= 0x40  # the last payload byte of that chunk
        path.write_bytes(bad)
        r = TraceFileReader(path)
        assert [c["kind"] for c in r.chunks()] == kinds
        assert r.truncated and "checksum" in r.problem and r.ignored_bytes == len(data) - ends[chunk - 1]


def test_a_huge_length_prefix_allocates_nothing(tmp_path, btf):
    data, ends = small_file(tmp_path, btf)
    path = tmp_path / "huge.vnt"
    for length, why in ((0xFFFFFFFF, "limit"), (MAX_CHUNK_BYTES, "cut short")):
        path.write_bytes(data + FRAME.pack(length, 0) + b"x" * 100)
        tracemalloc.start()
        try:
            r = TraceFileReader(path)
            kinds = [c["kind"] for c in r.chunks()]
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert kinds == ["header", "events", "stats", "end"]
        assert r.truncated and why in r.problem and r.ignored_bytes == FRAME.size + 100
        assert peak < 1 << 20


def test_a_newer_format_asks_for_an_upgrade(tmp_path, btf):
    data, _ = small_file(tmp_path, btf)
    path = tmp_path / "new.vnt"
    path.write_bytes(PREAMBLE.pack(MAGIC, FORMAT_VERSION + 1) + data[PREAMBLE.size:])
    with pytest.raises(UsageError) as e:
        TraceFileReader(path)
    assert str(e.value) == (f"trace file {path} is format v{FORMAT_VERSION + 1}, this vnet reads up to "
                            f"v{FORMAT_VERSION}: upgrade vnet")


@pytest.mark.parametrize("content", [b"not a trace", b"\x00" * 64, struct.pack("<8sH", MAGIC, 0)])
def test_something_else_is_not_a_trace_file(tmp_path, content):
    path = tmp_path / "other"
    path.write_bytes(content)
    with pytest.raises(UsageError, match="not a vnet trace file"):
        TraceFileReader(path)


def test_a_file_without_a_header_first_is_refused(tmp_path):
    path = tmp_path / "t.vnt"
    payload = msgpack.packb({"kind": "events", "seq": 0, "records": b"", "count": 0})
    path.write_bytes(PREAMBLE.pack(MAGIC, FORMAT_VERSION) + FRAME.pack(len(payload), zlib.crc32(payload)) + payload)
    with pytest.raises(UsageError, match="does not start with a header"):
        TraceFileReader(path)


def test_flat_chunks_unpack_to_views_of_the_same_values():
    """The copy-free reader of flat chunks (events) agrees with msgpack on every input:
    the same dict (bin values as views) or, for damaged bytes, the same refusal."""
    import random

    import msgpack

    from vnet.collector.tracefile import _unpack, _unpack_views

    samples = [{"kind": "events", "seq": 5, "records": b"\x01" * 300, "count": 7},
               {"kind": "clock", "seq": 1, "offset_ns": -3_000_000_000, "error_ns": 1500, "f": 1.5, "n": None,
                "t": True, "u": False},
               {"kind": "x", "seq": 2**40, "a": [1, 2], "m": {"b": 1}},
               {"kind": "k" * 40, "seq": -5, "big": b"x" * 70000, "i8": -100, "u16": 60000, "s": "é" * 200}]
    plain = lambda d: {k: bytes(v) if isinstance(v, memoryview) else v for k, v in d.items()}  # noqa: E731
    rng = random.Random(3)
    for d in samples:
        packed = msgpack.packb(d, use_bin_type=True)
        assert plain(_unpack_views(packed)) == _unpack(packed) == d
        for _ in range(300):
            bad = bytearray(packed[:rng.randrange(1, len(packed) + 1)])
            if bad and rng.random() < 0.5:
                bad[rng.randrange(len(bad))] = rng.randrange(256)
            try:
                want = _unpack(bytes(bad))
            except Exception:  # noqa: BLE001
                want = "refused"
            try:
                got = _unpack_views(bytes(bad))
                got = plain(got) if isinstance(got, dict) else got
            except Exception:  # noqa: BLE001
                got = "refused"
            assert got == want, bytes(bad)


def test_mapped_reading_sees_what_plain_reading_sees(tmp_path, btf):
    """chunks(views=True) (the file mapped, bin values as views) stops where chunks()
    stops, says the same about the torn or damaged tail, and yields the same chunks."""
    data, ends = small_file(tmp_path, btf)
    path = tmp_path / "views.vnt"
    damaged = bytearray(data)
    damaged[ends[2] - 1] ^= 0x40
    cases = [data[:n] for n in range(ends[0], len(data) + 1, 7)] + [bytes(damaged), data + FRAME.pack(2**32 - 1, 0)]
    for content in cases:
        path.write_bytes(content)
        plain, mapped = TraceFileReader(path), TraceFileReader(path)
        a = [(c["kind"], c["seq"], bytes(c["records"]) if "records" in c else None) for c in plain.chunks()]
        b = [(c["kind"], c["seq"], bytes(c["records"]) if "records" in c else None) for c in mapped.chunks(views=True)]
        assert a == b, len(content)
        assert (plain.truncated, plain.ignored_bytes, plain.problem) == \
            (mapped.truncated, mapped.ignored_bytes, mapped.problem), len(content)


# -- direct writes (the collector's default: around the page cache) ------------------------------------------

# Sizes around the 4 KiB blocks direct writes come in, and a chunk as large as an agent's.
DIRECT_SIZES = [0, 1, 100, 4095, 4096, 4097, 8191, 12288, 65536, 1 << 20, (10 << 20) + 7, 3, 4000]


def _direct_writer(path, header, **kw) -> TraceFileWriter:
    w = TraceFileWriter(path, header, direct=True, **kw)
    if not w.direct_io:
        w.close()
        pytest.skip(f"{path.parent}'s file system has no direct I/O")
    return w


def _write_sizes(w: TraceFileWriter, sizes, first_seq: int = 0) -> None:
    for i, n in enumerate(sizes, first_seq):
        w.write("events", seq=i, count=1, records=bytes([i % 251]) * n)


def _plain_bytes(tmp_path, header, sizes) -> bytes:
    """The file plain (page cache) writes make of the same chunks."""
    plain = TraceFileWriter(tmp_path / "plain.vnt", header)
    _write_sizes(plain, sizes)
    plain.close()
    return plain.paths[0].read_bytes()


@pytest.mark.parametrize("rotate", [None, 3 << 20])
def test_direct_writes_leave_the_bytes_buffered_writes_leave(tmp_path, header, rotate):
    """Whole blocks around the page cache, the partial last block through it and again
    directly once completed: every file byte for byte what plain writes make."""
    plain = TraceFileWriter(tmp_path / "plain.vnt", header, rotate_bytes=rotate)
    _write_sizes(plain, DIRECT_SIZES)
    plain.close()
    w = _direct_writer(tmp_path / "direct.vnt", header, rotate_bytes=rotate)
    _write_sizes(w, DIRECT_SIZES)
    assert w.direct_io
    w.close()
    assert len(w.paths) == len(plain.paths) > (1 if rotate else 0)
    for a, b in zip(plain.paths, w.paths):
        assert a.read_bytes() == b.read_bytes(), (a, b)
    r = TraceFileReader(w.paths[0])
    assert not r.truncated and [c["seq"] for c in r.chunks(["events"])][:3] == [0, 1, 2]


def test_every_direct_write_is_in_the_file_when_it_returns(tmp_path, header):
    """What an ack promises: after each write the file holds the chunk whole (the partial
    block is written through the page cache, not kept back for the next write)."""
    path = tmp_path / "t.vnt"
    w = _direct_writer(path, header)
    for i, n in enumerate(DIRECT_SIZES):
        w.write("events", seq=i, count=1, records=b"x" * n)
        r = TraceFileReader(path)
        assert [c["seq"] for c in r.chunks(["events"])][-1] == i and not r.truncated
    w.close()


@pytest.mark.parametrize("room", [0, 100, 4096, 9000])
def test_a_direct_write_that_does_not_fit_is_cut_off_and_writing_resumes(tmp_path, header, room):
    """The limit falls in the staged block, in the direct part or right at the end: the file
    is cut back to its last whole chunk, and the writes after it land as if nothing failed."""
    path = tmp_path / "t.vnt"
    w = _direct_writer(path, header)
    _write_sizes(w, [5000])
    size = path.stat().st_size
    with file_size_limit(size + room):
        with pytest.raises(OSError):
            _write_sizes(w, [20000], first_seq=1)
        assert path.stat().st_size == size
    _write_sizes(w, [20000, 7], first_seq=1)
    w.close()
    assert path.read_bytes() == _plain_bytes(tmp_path, header, [5000, 20000, 7])


def test_a_refused_direct_write_goes_through_the_page_cache_fake_einval(tmp_path, header, monkeypatch):
    """Pure logic, a faked refusal: a device that wants larger alignment than 4 KiB refuses the
    direct write (EINVAL); that chunk and the rest are written through the page cache."""
    path = tmp_path / "t.vnt"
    w = _direct_writer(path, header)
    _write_sizes(w, [5000, 3])

    def refuse(self, data):
        os.pwrite(self.fd, data[:data.nbytes // 2], self.aligned)  # part of it got there first
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(tracefile._DirectAppender, "_write_direct", refuse)
    _write_sizes(w, [20000, 9000], first_seq=2)
    assert not w.direct_io
    w.close()
    assert path.read_bytes() == _plain_bytes(tmp_path, header, [5000, 3, 20000, 9000])


def test_a_direct_writer_gives_its_grown_stage_back(tmp_path, header):
    w = _direct_writer(tmp_path / "t.vnt", header)
    _write_sizes(w, [10 << 20, 5])
    assert len(w._direct._stage) > 10 << 20
    w.trim()
    assert len(w._direct._stage) == tracefile.STAGE_KEPT
    _write_sizes(w, [6, 4096 * 3 + 1], first_seq=2)
    w.close()
    assert (tmp_path / "t.vnt").read_bytes() == _plain_bytes(tmp_path, header, [10 << 20, 5, 6, 4096 * 3 + 1])
