"""cffi (ABI mode) binding to the system's libdeflate for CRC-32, zlib's checksum (the same
values), which the trace files carry for every chunk (vnet/collector/tracefile.py): computed by
the collector and the recorder on every chunk written, checked by every reader.

zlib 1.2.13 (Debian 12's) computes it at ~4.2 GB/s here, libdeflate with carry-less multiply at
~14: a quarter of the collector's CPU was zlib's crc32 before (perf, tools/bench/drain.py).
libdeflate0 is an optional library (libtiff6 pulls it in; `make deps` installs it), so nothing is
assumed: without it, crc32() is zlib's, and `vnet doctor` says so. cffi releases the GIL around
the call, as zlib.crc32 does for large buffers.
"""

from __future__ import annotations

import os
import zlib

from . import _ffi
from ._cdef import DEFLATE_CDEF as CDEF  # noqa: F401 (checksum.CDEF: the declarations)

LIBRARY_NAMES = ("libdeflate.so.0",)
SMALL_BYTES = 2048  # below it zlib's call costs less than the library's through cffi
HINT = "apt-get install libdeflate0 (Debian/Ubuntu), dnf install libdeflate (Fedora)"
WITHOUT = "VNET_WITHOUT_LIBDEFLATE"  # set (tests, benchmarks): zlib's, as on a system without it

ffi = _ffi.load("_deflate_ffi")
CHECK = (b"123456789", 0xCBF43926)  # CRC-32's check value: the library computes zlib's CRC


def _unfit(library) -> str | None:
    return None if library.libdeflate_crc32(0, CHECK[0], len(CHECK[0])) == CHECK[1] else "not zlib's CRC-32"


_library = _ffi.OptionalLibrary(ffi, LIBRARY_NAMES, _unfit, "libdeflate", HINT,
                                turned_off=f"turned off ({WITHOUT})" if os.environ.get(WITHOUT) else None)


def lib():
    """libdeflate, or UnsupportedError saying why not (once looked up, remembered)."""
    return _library.lib()


def why_not() -> str | None:
    """Why libdeflate cannot be used (None: it can, or it was not looked up yet)."""
    return _library.why_not


def available() -> bool:
    return _library.available()


def _zlib(data, value: int = 0) -> int:
    return zlib.crc32(data, value)


def _deflate(library):
    crc = library.libdeflate_crc32

    def crc32(data, value: int = 0) -> int:
        if (data.nbytes if type(data) is memoryview else len(data)) < SMALL_BYTES:
            return zlib.crc32(data, value)
        buf = ffi.from_buffer(data)
        return crc(value, buf, len(buf))
    return crc32


def _pick():
    return _deflate(lib()) if available() else _zlib


crc32 = _pick()
"""crc32(data, value=0): zlib.crc32's value (continued from `value`), through libdeflate when the
system has it. `data`: any contiguous buffer (bytes, bytearray, memoryview, mmap)."""
