"""msgpack maps that end in a large blob (an events chunk's records), packed without
copying the blob: the bytes msgpack.packb gives, as a short head and the blob where
it is, for one writev/sendmsg and a CRC or HMAC computed over both in turn.

A chunk of 64 Ki events is ~10 MB; packb copies it into a new bytes object, and
framing (length, CRC or tag in front) copies it again. The bytes on disk and on
the wire do not change (tests/unit/test_tracefile.py compares them with packb's).
"""

from __future__ import annotations

import msgpack

BLOB_MIN = 1 << 16  # a shorter last value is packed (copied) like any other
BIN32 = b"\xc6"     # msgpack's bin 32 header byte: what packb uses for 64 KiB and more
EMPTY_BIN = b"\xc4\x00"  # bin 8 of length 0: what packb gives for b""


def pack_parts(payload: dict) -> tuple[bytes, memoryview | None]:
    """(head, blob) with head + blob == msgpack.packb(payload, use_bin_type=True):
    blob is the map's last value, as a byte view of it, when that is a bytes-like
    object of at least BLOB_MIN bytes; otherwise None and head is all of it."""
    if payload:
        last = next(reversed(payload))
        value = payload[last]
        if isinstance(value, (bytes, bytearray, memoryview)):
            blob = memoryview(value).cast("B") if isinstance(value, memoryview) else memoryview(value)
            if BLOB_MIN <= blob.nbytes < 1 << 32:
                head = msgpack.packb({**payload, last: b""}, use_bin_type=True)  # same keys, same order
                if head.endswith(EMPTY_BIN):
                    return head[:-len(EMPTY_BIN)] + BIN32 + blob.nbytes.to_bytes(4, "big"), blob
    return msgpack.packb(payload, use_bin_type=True), None


def parts_size(head: bytes, blob: memoryview | None) -> int:
    return len(head) + (blob.nbytes if blob is not None else 0)
