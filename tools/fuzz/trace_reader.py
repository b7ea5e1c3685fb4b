#!/usr/bin/env python3
"""Coverage-guided fuzzing of the trace-file reader (vnet/collector/tracefile.py) and the
analysis' decode of what it reads: only a UsageError may come out (and only at open, or
from an undecodable header's record layout), anything else is a finding.

The first input byte chooses how the rest becomes a file: as it is (framing, checksums,
preamble), or split at 0xff-runs into chunk payloads, each framed with its right length
and CRC after the real header of tests/fixtures/traces/veth-path.vnt, so that the fuzzer
reaches the msgpack and ring-batch decoders behind the checksum.

    sudo? no: python tools/fuzz/trace_reader.py -max_total_time=180
"""

from __future__ import annotations

import os
import tempfile
import zlib

import atheris

from common import ROOT, read_everything, run

with atheris.instrument_imports():
    from vnet.collector.tracefile import FRAME, MAGIC, PREAMBLE, TraceFileReader  # noqa: F401 - instrumented

REAL = (ROOT / "tests" / "fixtures" / "traces" / "veth-path.vnt").read_bytes()
HEADER_END = PREAMBLE.size + FRAME.size + FRAME.unpack_from(REAL, PREAMBLE.size)[0]
PATH = os.path.join(tempfile.mkdtemp(prefix="vnet-fuzz-trace-"), "t.vnt")


def framed(data: bytes) -> bytes:
    out = bytearray(REAL[:HEADER_END])
    for payload in data.split(b"\xff\xff"):
        out += FRAME.pack(len(payload), zlib.crc32(payload)) + payload
    return bytes(out)


def test_one(data: bytes) -> None:
    if not data:
        return
    body = data[1:] if data[0] & 1 else framed(data[1:])
    with open(PATH, "wb") as f:
        f.write(body)
    read_everything(PATH)


if __name__ == "__main__":
    seeds = [b"\x01" + REAL[:4096], b"\x01" + MAGIC + b"\x01\x00", b"\x00\x82\xa4kind\xa6events\xa3seq\x00"]
    run(test_one, seeds)
