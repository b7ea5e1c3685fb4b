"""CRC-32 through the system's libdeflate (vnet/binding/checksum.py): zlib's values for every
kind of buffer the trace files give it, at every size around the point where it hands small
ones to zlib, continued from any value; and without the library (turned off, or missing), zlib's
own, with the reason remembered for `vnet doctor`."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import sys
import zlib

import pytest

from vnet.binding import checksum
from vnet.errors import UnsupportedError

needs_libdeflate = pytest.mark.skipif(not checksum.available(), reason="no libdeflate here (apt-get install libdeflate0)")


@needs_libdeflate
def test_libdeflate_is_used_and_gives_zlibs_values_for_every_buffer_and_start():
    assert checksum.crc32 is not checksum._zlib
    rng = random.Random(10)
    sizes = [0, 1, 7, 8, 63, checksum.SMALL_BYTES - 1, checksum.SMALL_BYTES, checksum.SMALL_BYTES + 1,
             4096, 65536 + 3, (10 << 20) + 5]
    for n in sizes:
        data = rng.randbytes(n)
        for start in (0, 1, 0xFFFFFFFF, rng.getrandbits(32)):
            want = zlib.crc32(data, start)
            assert checksum.crc32(data, start) == want, (n, start)
            assert checksum.crc32(bytearray(data), start) == want
            assert checksum.crc32(memoryview(data), start) == want
    with mmap.mmap(-1, 1 << 20) as m:  # a mapping, as the readers give it, at an odd offset
        m.write(rng.randbytes(1 << 20))
        view = memoryview(m)[13:]
        assert checksum.crc32(view) == zlib.crc32(view)
        assert checksum.crc32(m) == zlib.crc32(m)
        view.release()


@needs_libdeflate
def test_a_crc_continues_across_pieces_as_over_their_concatenation():
    """The trace file frames a chunk as head then records: crc32(records, crc32(head))."""
    rng = random.Random(11)
    head, records = rng.randbytes(90), rng.randbytes(152 * 65536)
    assert checksum.crc32(records, checksum.crc32(head)) == zlib.crc32(head + records)
    words = memoryview(records).cast("I")  # a view of 4-byte items: its size is in bytes, not items
    assert checksum.crc32(words[:checksum.SMALL_BYTES // 4 + 1]) == zlib.crc32(records[:checksum.SMALL_BYTES + 4])


def test_without_libdeflate_zlibs_is_used_and_the_reason_kept(monkeypatch):
    from vnet.binding import _ffi

    monkeypatch.setattr(checksum, "_library", _ffi.OptionalLibrary(
        checksum.ffi, ("libvnet-no-such-deflate.so.0",), checksum._unfit, "libdeflate", checksum.HINT))
    assert not checksum.available() and checksum._pick() is checksum._zlib
    with pytest.raises(UnsupportedError) as e:
        checksum.lib()
    assert "libvnet-no-such-deflate.so.0" in str(e.value) and "libdeflate0" in e.value.hint
    assert "libvnet-no-such-deflate.so.0" in checksum.why_not()
    data = os.urandom(5000)
    assert checksum._zlib(data, 7) == zlib.crc32(data, 7)


def test_turned_off_by_the_environment_in_a_process_of_its_own():
    code = ("from vnet.binding import checksum as c; from vnet.probes import features as f\n"
            "print(c.crc32 is c._zlib, f.check('libdeflate').support.name, c.crc32(b'123456789') == 0xCBF43926)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, checksum.WITHOUT: "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "UNSUPPORTED", "True"], r.stdout
