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

import logging
import os
import threading
import zlib

from vnet.errors import UnsupportedError

from . import _ffi
from ._cdef import DEFLATE_CDEF as CDEF  # noqa: F401 (checksum.CDEF: the declarations)

log = logging.getLogger("vnet.checksum")

LIBRARY_NAMES = ("libdeflate.so.0",)
SMALL_BYTES = 2048  # below it zlib's call costs less than the library's through cffi
HINT = "apt-get install libdeflate0 (Debian/Ubuntu), dnf install libdeflate (Fedora)"
WITHOUT = "VNET_WITHOUT_LIBDEFLATE"  # set (tests, benchmarks): zlib's, as on a system without it

ffi = _ffi.load("_deflate_ffi")
_lib = None
_why_not: str | None = None
_lock = threading.Lock()


def lib():
    """libdeflate, or UnsupportedError saying why not (once looked up, remembered)."""
    global _lib, _why_not
    with _lock:
        if _lib is None and _why_not is None:
            errors = []
            if os.environ.get(WITHOUT):
                errors.append(f"turned off ({WITHOUT})")
            else:
                for name in LIBRARY_NAMES:
                    try:
                        candidate = ffi.dlopen(name)
                        if candidate.libdeflate_crc32(0, b"123456789", 9) != 0xCBF43926:  # the CRC-32 check value
                            errors.append(f"{name}: not zlib's CRC-32")
                            continue
                        _lib = candidate
                        break
                    except (OSError, AttributeError) as e:  # missing, or without the symbol
                        errors.append(f"{name}: {e}")
            if _lib is None:
                _why_not = "; ".join(errors)
        if _lib is None:
            raise UnsupportedError(f"libdeflate not supported (requires {' or '.join(LIBRARY_NAMES)}: {_why_not})",
                                   hint=HINT)
    return _lib


def available() -> bool:
    try:
        lib()
    except UnsupportedError:
        return False
    return True


def _zlib(data, value: int = 0) -> int:
    return zlib.crc32(data, value)


def _deflate(data, value: int = 0) -> int:
    if (data.nbytes if type(data) is memoryview else len(data)) < SMALL_BYTES:
        return zlib.crc32(data, value)
    buf = ffi.from_buffer(data)
    return _lib.libdeflate_crc32(value, buf, len(buf))


def _pick():
    return _deflate if available() else _zlib


crc32 = _pick()
"""crc32(data, value=0): zlib.crc32's value (continued from `value`), through libdeflate when the
system has it. `data`: any contiguous buffer (bytes, bytearray, memoryview, mmap)."""
