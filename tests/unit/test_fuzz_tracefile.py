"""Hostile trace files (issue 11): generated inputs against the trace-file reader and the
analysis that decodes what it reads. No kernel: the inputs are files.

Two kinds of input:
- a real recording (tests/fixtures/traces/veth-path.vnt) cut, with bytes flipped,
  spliced or a length prefix replaced: the framing and checksums must stop the reader
  cleanly (.truncated, .problem), never raise anything but a UsageError at open;
- well-framed files (right lengths and checksums) whose chunks are generated msgpack
  values: maps of the right kinds with fields of the wrong types, events chunks whose
  records are random or mutated ring batches, unknown kinds, deep nesting. The
  checksum cannot catch these, so every decoder behind it is exercised: the reader
  must step over or report what it cannot read, and `vnet analyze`'s decode must
  report problems or refuse the file with a UsageError, and nothing else.

Every example runs under a memory bound (tracemalloc peak) and hypothesis' deadline.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import msgpack
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vnet.collector.tracefile import FRAME, MAGIC, PREAMBLE  # noqa: E402
from vnet.errors import UsageError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _read_everything():
    """tools/fuzz/common.py's read_everything (tools/fuzz is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vnet_fuzz_common", ROOT / "tools" / "fuzz" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_everything


read_everything = _read_everything()
REAL = (ROOT / "tests" / "fixtures" / "traces" / "veth-path.vnt").read_bytes()
MEMORY_BOUND = 64 << 20          # no input may make the reader hold more than this at once
FUZZ = settings(max_examples=4000, deadline=2000, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)


def _real_chunks() -> list[dict]:
    out, off = [], PREAMBLE.size
    while off < len(REAL):
        length, _ = FRAME.unpack_from(REAL, off)
        out.append(msgpack.unpackb(REAL[off + FRAME.size:off + FRAME.size + length], raw=False))
        off += FRAME.size + length
    return out


CHUNKS = _real_chunks()
HEADER = CHUNKS[0]
RECORDS = [c["records"] for c in CHUNKS if c["kind"] == "events"]


def frame(payload: bytes) -> bytes:
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def read_all(path: Path) -> None:
    """What every reader of a trace file does (tools/fuzz/common.py's read_everything, the
    coverage-guided harness's too), within MEMORY_BOUND of Python allocations."""
    tracemalloc.start()
    try:
        read_everything(path)
        assert tracemalloc.get_traced_memory()[1] < MEMORY_BOUND
    finally:
        tracemalloc.stop()


# -- the real file, damaged -------------------------------------------------------------------------

@st.composite
def damaged(draw) -> bytes:
    data = bytearray(REAL)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["cut", "flip", "splice", "length", "zero"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if how == "cut":
            del data[at:]
        elif how == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif how == "length" and len(data) >= at + 4:
            data[at:at + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 7, 1 << 20, 64 << 20, (64 << 20) + 1,
                                                                     0xFFFFFFFF])))
        elif how == "zero":
            data[at:at + draw(st.integers(1, 32))] = bytes(min(32, len(data) - at))
    return bytes(data)


@FUZZ
@given(data=damaged())
def test_a_damaged_recording_reads_up_to_the_damage(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fz") / "t.vnt"
    path.write_bytes(data)
    read_all(path)


@settings(max_examples=500, deadline=2000, derandomize=True)
@given(data=st.binary(max_size=256))
def test_anything_else_is_refused_in_words(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fz") / "t.vnt"
    path.write_bytes(data)
    read_all(path)


# -- well framed, hostile content -------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(allow_nan=True),
                    st.text(max_size=16), st.binary(max_size=64))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=20)


@st.composite
def records(draw) -> bytes:
    """Ring-batch bytes: a real batch mutated, or random bytes, or a real batch cut."""
    base = bytearray(draw(st.sampled_from(RECORDS)))
    how = draw(st.sampled_from(["flip", "cut", "random", "lengths"]))
    if how == "random":
        return draw(st.binary(max_size=512))
    if how == "cut":
        return bytes(base[:draw(st.integers(0, len(base)))])
    if how == "lengths":  # a record header (u32 length | busy/discard bits) replaced
        at = draw(st.integers(0, max(0, len(base) // 8 - 1))) * 8
        base[at:at + 4] = struct.pack("<I", draw(st.integers(0, 0xFFFFFFFF)))
        return bytes(base)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(base) - 1))
        base[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(base)


@st.composite
def chunk(draw) -> dict:
    kind = draw(st.sampled_from(["events", "events", "stats", "clock", "gap", "end", "header", "nonsense"]))
    c = {"kind": kind, "seq": draw(st.one_of(st.integers(-2, 10), values))}
    if kind == "events":
        c["records"] = draw(st.one_of(records(), values))
        c["count"] = draw(st.one_of(st.integers(0, 100), values))
    elif kind == "clock":
        c.update(offset_ns=draw(st.one_of(st.integers(-(1 << 62), 1 << 62), values)),
                 error_ns=draw(st.one_of(st.integers(0, 1 << 40), values)),
                 agent_mono_ns=draw(st.one_of(st.integers(0, 1 << 62), values)))
    else:
        c.update(draw(st.dictionaries(st.text(max_size=8), values, max_size=4)))
    if draw(st.booleans()):
        c = draw(st.sampled_from([c, [c], "x", 7, {"seq": 1}]))  # not even a chunk
    return c


@st.composite
def header(draw) -> dict:
    """The real header, one field of it broken or not."""
    h = dict(HEADER)
    if draw(st.booleans()):
        key = draw(st.sampled_from(sorted(h)))
        h[key] = draw(values)
    return h


def build(h: dict, chunks: list) -> bytes:
    out = bytearray(PREAMBLE.pack(MAGIC, 1))
    for c in [h, *chunks]:
        out += frame(msgpack.packb(c, use_bin_type=True))
    return bytes(out)


@FUZZ
@given(h=header(), chunks=st.lists(chunk(), max_size=6))
def test_well_framed_hostile_chunks_are_stepped_over_or_reported(tmp_path_factory, h, chunks):
    path = tmp_path_factory.mktemp("fz") / "t.vnt"
    path.write_bytes(build(h, chunks))
    read_all(path)


@settings(max_examples=400, deadline=10_000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(h=header(), chunks=st.lists(chunk(), min_size=1, max_size=5))
def test_analyze_decodes_or_refuses_hostile_files(tmp_path_factory, h, chunks):
    """`vnet analyze`'s decode (numpy views of the records, the path join) on the same files:
    problems are reported per host, an undecodable header is a UsageError; nothing else."""
    np = pytest.importorskip("numpy")  # noqa: F841
    from vnet.analysis.report import analyze
    from vnet.analysis.stream import read_table

    path = tmp_path_factory.mktemp("fz") / "t.vnt"
    path.write_bytes(build(h, chunks))
    try:
        table = read_table([path], parallel=False)
    except UsageError:
        return
    report = analyze(table)
    assert isinstance(report["verdict"], str)
