"""The ring-batch walker and its framing on synthetic rings (pure logic: no
kernel; the programs never discard, so discarded and busy records are made here)."""

import random
import struct

import pytest

from vnet.binding.ringbatch import BUSY_BIT, DISCARD_BIT, HDR_SIZE, pack_records, records, walk


def ring_bytes(sizes, discarded=(), busy=None) -> bytes:
    """Records of the given payload sizes in ring framing; record `busy` left uncommitted."""
    blob = bytearray(pack_records([bytes([i % 251]) * n for i, n in enumerate(sizes)], discarded))
    if busy is not None:
        pos = sum(HDR_SIZE + (n + 7) // 8 * 8 for n in sizes[:busy])
        struct.pack_into("=I", blob, pos, struct.unpack_from("=I", blob, pos)[0] | BUSY_BIT)
    return bytes(blob)


def words(blob: bytes) -> memoryview:
    return memoryview(blob).cast("I")


def reference_walk(blob: bytes, start: int, limit: int, max_records=None):
    """The plain one-header-at-a-time walk the fast one must agree with."""
    pos = count = discarded = 0
    left = max_records if max_records is not None else limit
    while pos < limit and left > 0:
        len_flags = struct.unpack_from("=I", blob, start + pos)[0]
        if len_flags & BUSY_BIT:
            break
        size = ((len_flags & (DISCARD_BIT - 1)) + HDR_SIZE + 7) & ~7
        if pos + size > limit and pos:
            break
        pos += size
        left -= 1
        if len_flags & DISCARD_BIT:
            discarded += 1
        else:
            count += 1
    return pos, count, discarded


def test_a_run_of_same_size_records_is_taken_whole():
    blob = ring_bytes([144] * 1000)
    assert walk(words(blob), 0, len(blob)) == (len(blob), 1000, 0)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 7, 64, 511, 999])
def test_the_walk_stops_at_the_first_busy_record(k):
    blob = ring_bytes([144] * 1000, busy=k)
    assert walk(words(blob), 0, len(blob)) == (k * 152, k, 0)


def test_discarded_records_are_walked_over_counted_and_skipped_when_split():
    sizes = [144, 144, 144, 40, 144, 144]
    blob = ring_bytes(sizes, discarded=[1, 3])
    assert walk(words(blob), 0, len(blob)) == (len(blob), 4, 2)
    assert [len(r) for r in records(blob)] == [144, 144, 144, 144]
    assert [bytes(r)[0] for r in records(blob)] == [0, 2, 4, 5]


def test_limits_on_records_and_bytes():
    blob = ring_bytes([144] * 10)
    assert walk(words(blob), 0, len(blob), max_records=3) == (3 * 152, 3, 0)
    assert walk(words(blob), 0, 5 * 152 + 100) == (5 * 152, 5, 0)  # max_bytes: whole records only
    assert walk(words(blob), 0, 100) == (152, 1, 0)  # a record bigger than max_bytes still goes alone
    assert walk(words(blob), 0, 0) == (0, 0, 0)


def test_records_that_wrap_read_contiguous_in_a_double_mapping():
    """A ring of 1024 bytes whose records straddle its end, laid out as the kernel
    maps it (data twice in a row): walking from the consumer offset needs no wrap."""
    size = 1024
    sizes = [100, 144, 60, 144, 144, 8]
    flat = ring_bytes(sizes)
    start = size - 200  # the consumer position's offset: the third record crosses the end
    ring = bytearray(size)
    for i, b in enumerate(flat):
        ring[(start + i) % size] = b
    mapping = bytes(ring) * 2
    pos, count, discarded = walk(words(mapping), start, len(flat))
    assert (pos, count, discarded) == (len(flat), len(sizes), 0)
    assert [bytes(r) for r in records(mapping[start:start + pos])] == [bytes([i]) * n for i, n in enumerate(sizes)]


def test_the_fast_walk_agrees_with_the_plain_one_on_random_rings():
    rng = random.Random(7)
    for _ in range(400):
        n = rng.randrange(1, 300)
        # Long runs of one size with a few others in between, as packet and sched events mix.
        sizes = [rng.choice((144, 144, 144, 144, 72, 8, 1)) if rng.random() < 0.2 else 144 for _ in range(n)]
        discarded = [i for i in range(n) if rng.random() < 0.05]
        busy = rng.randrange(n) if rng.random() < 0.5 else None
        blob = ring_bytes(sizes, discarded, busy)
        limit = rng.choice((len(blob), rng.randrange(len(blob) + 1)))
        max_records = rng.choice((None, rng.randrange(1, n + 1)))
        assert walk(words(blob), 0, limit, max_records) == reference_walk(blob, 0, limit, max_records)
        if busy is None:
            assert [bytes(r) for r in records(blob)] == [bytes([i % 251]) * n for i, n in enumerate(sizes)
                                                         if i not in discarded]


@pytest.mark.parametrize("blob, what", [
    (pack_records([b"x" * 16])[:-1], "bad record header"),        # cut inside the record
    (pack_records([b"x" * 16]) + b"\0\0\0", "stray bytes"),        # cut inside a header
    (ring_bytes([16], busy=0), "bad record header"),               # never committed
])
def test_a_damaged_blob_is_an_error_not_garbage(blob, what):
    with pytest.raises(ValueError, match=what):
        list(records(blob))


def test_pack_records_pads_to_eight_and_round_trips():
    items = [b"", b"a", b"abcdefgh", b"x" * 13]
    blob = pack_records(items)
    assert len(blob) % 8 == 0 and len(blob) == sum(8 + (len(i) + 7) // 8 * 8 for i in items)
    assert [bytes(r) for r in records(blob)] == items
