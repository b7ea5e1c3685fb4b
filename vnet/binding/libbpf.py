"""Load the system's libbpf.so.1 through cffi in ABI mode (no compiler needed).

libbpf's own messages go to the `vnet.libbpf` logger; the most recent ones are
kept so a failed load can carry the verifier log in its exception.
"""

from __future__ import annotations

import collections
import logging
import threading

from vnet.errors import LibbpfMissingError, UnsupportedError

from . import _ffi
from ._cdef import OPTIONAL_SYMBOLS

log = logging.getLogger("vnet.libbpf")

ffi = _ffi.load("_libbpf_ffi")  # _cdef.CDEF and LIBC_CDEF, pre-parsed

LIBRARY_NAMES = ("libbpf.so.1", "libbpf.so")
MIN_VERSION = (1, 0)
_PRINT_LEVELS = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}

_lib = None
_libc = None
_lock = threading.Lock()
# One entry per libbpf message (a verifier log is one message of many lines).
_recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=4000)
_seq = 0


def _open_library():
    errors = []
    for name in LIBRARY_NAMES:
        try:
            return ffi.dlopen(name)
        except OSError as e:
            errors.append(f"{name}: {e}")
    raise LibbpfMissingError(
        "libbpf not found (" + "; ".join(errors) + ")",
        hint="install the libbpf runtime: apt-get install libbpf1 (Debian/Ubuntu), dnf install libbpf (Fedora)",
    )


@ffi.callback("int(int, const char *, void *)", error=0)
def _print(level, fmt, ap):
    if level >= 2 and not _keep_debug():
        # libbpf's debug lines (~1700 per object load: CO-RE relocations...) cost ~8 us each here;
        # nothing reads them unless -vv shows them (a failed load's diagnosis uses warnings).
        return 0
    strp = ffi.new("char **")
    n = _libc.vasprintf(strp, fmt, ap)
    if n < 0:
        return 0
    try:
        text = ffi.string(strp[0], n).decode(errors="replace").rstrip("\n")
    finally:
        _libc.free(strp[0])
    global _seq
    _seq += 1
    _recent.append((_seq, text))
    for line in text.splitlines():
        log.log(_PRINT_LEVELS.get(level, logging.DEBUG), "%s", line)
    return 0


def _keep_debug() -> bool:
    return log.isEnabledFor(logging.DEBUG)


def lib():
    """The loaded libbpf, checked to be >= 1.0; loaded once per process."""
    global _lib, _libc
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            handle = _open_library()
            version = (handle.libbpf_major_version(), handle.libbpf_minor_version())
            if version < MIN_VERSION:
                raise UnsupportedError(
                    f"libbpf {version[0]}.{version[1]} not supported (requires libbpf >= 1.0)",
                    hint="install libbpf1 (Debian 12+, Ubuntu 23.04+)",
                )
            _libc = ffi.dlopen(None)
            handle.libbpf_set_print(_print)
            _lib = handle
    return _lib


def version() -> str:
    return ffi.string(lib().libbpf_version_string()).decode()


def has(symbol: str) -> bool:
    """Whether the loaded libbpf exports `symbol` (for functions newer than 1.0)."""
    if symbol not in OPTIONAL_SYMBOLS:
        raise KeyError(f"{symbol} is not declared as optional")
    try:
        getattr(lib(), symbol)
    except (AttributeError, ffi.error):  # in-line cdef: AttributeError; pre-parsed (out-of-line): ffi.error
        return False
    return True


def mark_log() -> int:
    """A position in libbpf's recent messages, to collect what an operation printed."""
    return _seq


def messages_since(marker: int) -> list[str]:
    return [line for seq, text in list(_recent) if seq > marker for line in text.splitlines()]


def strerror(err: int) -> str:
    buf = ffi.new("char[]", 256)
    lib().libbpf_strerror(err, buf, 256)
    return ffi.string(buf).decode(errors="replace")
