"""cffi (ABI mode) binding to the system's libpcap: compile a tcpdump expression
into classic BPF for a link type, print it as `tcpdump -d` does, and run
libpcap's own matcher on a packet (the reference the translated filters are
tested against). No capture handle is ever opened: pcap_open_dead only.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from vnet.errors import UnsupportedError, UsageError

from . import _ffi
from ._cdef import PCAP_CDEF as CDEF  # noqa: F401 (pcap.CDEF: what tests/unit/test_cdef_layout.py checks)


LIBRARY_NAMES = ("libpcap.so.1", "libpcap.so.0.8", "libpcap.so")
DLT_EN10MB = 1    # Ethernet
DLT_RAW = 12      # raw IPv4/IPv6, no link header (LINKTYPE_RAW)
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
SNAPLEN = 262144  # tcpdump's default: the largest packet

ffi = _ffi.load("_pcap_ffi")  # CDEF, pre-parsed
_lib = None
# pcap_compile's parser keeps global state in libpcap < 1.8; one at a time everywhere.
_lock = threading.RLock()


def lib():
    global _lib
    with _lock:
        if _lib is None:
            errors = []
            for name in LIBRARY_NAMES:
                try:
                    _lib = ffi.dlopen(name)
                    break
                except OSError as e:
                    errors.append(f"{name}: {e}")
            else:
                logging.getLogger("vnet.pcap").debug("libpcap: %s", "; ".join(errors))
                raise UnsupportedError(
                    f"tcpdump filter expressions not supported (requires libpcap: none of "
                    f"{', '.join(LIBRARY_NAMES)} loads)",
                    hint="apt-get install libpcap0.8 (Debian/Ubuntu), dnf install libpcap (Fedora)")
    return _lib


def version() -> str:
    return ffi.string(lib().pcap_lib_version()).decode()


@dataclass(frozen=True)
class ClassicInsn:
    """One classic BPF instruction (struct bpf_insn)."""

    code: int
    jt: int
    jf: int
    k: int


class CompileError(UsageError):
    """libpcap refused the expression for this link type; `reason` is its message."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


def compile_classic(expression: str, linktype: int, optimize: bool = True) -> list[ClassicInsn]:
    """`expression` as classic BPF for `linktype` (DLT_*), exactly as tcpdump would run it."""
    pcap = lib()
    with _lock:
        handle = pcap.pcap_open_dead(linktype, SNAPLEN)
        if handle == ffi.NULL:
            raise UnsupportedError(f"libpcap cannot open a dead handle for link type {linktype}")
        prog = ffi.new("struct bpf_program *")
        try:
            if pcap.pcap_compile(handle, prog, expression.encode(), int(optimize), PCAP_NETMASK_UNKNOWN) != 0:
                reason = ffi.string(pcap.pcap_geterr(handle)).decode(errors="replace")
                raise CompileError(f"bad filter expression {expression!r}: {reason}", reason)
            try:
                return [ClassicInsn(i.code, i.jt, i.jf, i.k) for i in prog.bf_insns[0:prog.bf_len]]
            finally:
                pcap.pcap_freecode(prog)
        finally:
            pcap.pcap_close(handle)


def _program(insns: list[ClassicInsn]):
    arr = ffi.new("struct bpf_insn[]", [(i.code, i.jt, i.jf, i.k) for i in insns])
    prog = ffi.new("struct bpf_program *", {"bf_len": len(insns), "bf_insns": arr})
    return prog, arr


def image(insns: list[ClassicInsn]) -> list[str]:
    """The program as `tcpdump -d` prints it (libpcap's bpf_image)."""
    prog, arr = _program(insns)
    with _lock:
        return [ffi.string(lib().bpf_image(arr + n, n)).decode() for n in range(len(insns))]


def offline_filter(insns: list[ClassicInsn], packet: bytes, wirelen: int | None = None) -> bool:
    """libpcap's own matcher on `packet` (captured bytes; wirelen defaults to their length)."""
    prog, arr = _program(insns)
    hdr = ffi.new("struct pcap_pkthdr *", {"caplen": len(packet),
                                            "len": len(packet) if wirelen is None else wirelen})
    buf = ffi.from_buffer(packet) if packet else ffi.new("unsigned char[1]")
    return lib().pcap_offline_filter(prog, hdr, buf) != 0
