"""cffi (ABI mode) binding to the system's libcrypto (OpenSSL >= 1.1): GMAC, the tag of
AES-128-GCM computed over associated data only, for the wire protocol's session frames
(vnet/protocol/channel.py). ~7x cheaper than HMAC-SHA256 here (AES-NI and carry-less
multiply): the largest single cost of shipping events was the MAC on each side.

Python's hashlib already loads libcrypto.so.3 (Debian's libssl3, which python3 depends on),
so this adds no package. Nothing here is assumed: `available()` loads and tries it once, and
the protocol falls back to HMAC-SHA256 when it says no. cffi releases the GIL around each
call, so a tag over a 10 MB chunk runs beside the other threads.
"""

from __future__ import annotations

import logging

from vnet.errors import UnsupportedError

from . import _ffi
from ._cdef import CRYPTO_CDEF as CDEF  # noqa: F401 (crypto.CDEF: the declarations)

log = logging.getLogger("vnet.crypto")

LIBRARY_NAMES = ("libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.so")
EVP_CTRL_GCM_GET_TAG = 0x10
KEY_BYTES = 16
NONCE_BYTES = 12        # GCM's native IV size: no GHASH over the IV
TAG_BYTES = 16
_MAX_UPDATE = 1 << 30   # EVP_EncryptUpdate takes an int length
HINT = "install OpenSSL's library: apt-get install libssl3 (Debian/Ubuntu), dnf install openssl-libs (Fedora)"

ffi = _ffi.load("_crypto_ffi")  # CRYPTO_CDEF, pre-parsed
_library = _ffi.OptionalLibrary(ffi, LIBRARY_NAMES, lambda lib: None if lib.EVP_aes_128_gcm() != ffi.NULL
                                else "no AES-128-GCM", "GMAC", HINT)
_warned = False


def lib():
    """libcrypto with AES-128-GCM, or UnsupportedError saying why not (once looked up, remembered)."""
    global _warned
    try:
        return _library.lib()
    except UnsupportedError:
        if not _warned:  # once per process: the protocol falls back to HMAC-SHA256, ~7x the CPU per byte shipped
            _warned = True
            log.warning("GMAC unavailable (%s): session frames use HMAC-SHA256 (hint: %s)", why_not(), HINT)
        raise


def why_not() -> str | None:
    """Why libcrypto's GMAC cannot be used (None: it can, or it was not looked up yet)."""
    return _library.why_not


def available() -> bool:
    try:
        lib()
    except UnsupportedError:
        return False
    return True


def version() -> str:
    return ffi.string(lib().OpenSSL_version(0)).decode()


class Gmac:
    """Tags under one 128-bit key: tag(nonce, pieces) = AES-128-GCM's tag with the pieces,
    in order, as associated data (the same as over their concatenation) and no plaintext.
    The caller never repeats a nonce under a key. Not thread-safe: one per sender/receiver."""

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError(f"GMAC key of {len(key)} bytes, not {KEY_BYTES}")
        self._lib = lib()
        ctx = self._lib.EVP_CIPHER_CTX_new()
        if ctx == ffi.NULL:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        self._ctx = ffi.gc(ctx, self._lib.EVP_CIPHER_CTX_free)
        # The key schedule once; each tag only sets the IV (EVP_EncryptInit_ex with NULL cipher and key).
        self._check(self._lib.EVP_EncryptInit_ex(self._ctx, self._lib.EVP_aes_128_gcm(), ffi.NULL, key, ffi.NULL),
                    "EVP_EncryptInit_ex")
        self._outl = ffi.new("int *")
        self._tag = ffi.new("unsigned char[]", TAG_BYTES)

    @staticmethod
    def _check(ok: int, what: str) -> None:
        if ok != 1:
            raise RuntimeError(f"libcrypto {what} failed")

    def tag(self, nonce: bytes, pieces) -> bytes:
        L, ctx, outl = self._lib, self._ctx, self._outl
        if len(nonce) != NONCE_BYTES:
            raise ValueError(f"GMAC nonce of {len(nonce)} bytes, not {NONCE_BYTES}")
        self._check(L.EVP_EncryptInit_ex(ctx, ffi.NULL, ffi.NULL, ffi.NULL, nonce), "EVP_EncryptInit_ex")
        for piece in pieces:
            n = memoryview(piece).nbytes
            if not n:
                continue
            buf = ffi.from_buffer("unsigned char[]", piece)  # no copy: the bytes where they are
            for off in range(0, n, _MAX_UPDATE):  # out NULL: associated data
                self._check(L.EVP_EncryptUpdate(ctx, ffi.NULL, outl, buf + off, min(n - off, _MAX_UPDATE)),
                            "EVP_EncryptUpdate")
        self._check(L.EVP_EncryptFinal_ex(ctx, self._tag, outl), "EVP_EncryptFinal_ex")
        self._check(L.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_BYTES, self._tag), "EVP_CTRL_GCM_GET_TAG")
        return bytes(ffi.buffer(self._tag, TAG_BYTES))
