"""GMAC through the system's libcrypto (vnet/binding/crypto.py), against GCM's definition
(NIST SP 800-38D) computed here in Python: the tag over associated data given in pieces at
any boundaries is the tag over their concatenation, and it is GCM's, not something else."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from vnet.binding import crypto

needs_gcm = pytest.mark.skipif(not crypto.available(), reason="no libcrypto with AES-128-GCM here")

# AES-128 under the zero key: H = E(0^128), and E(J0) for the zero IV (J0 = 0^96 || 1), which is
# the GCM tag of nothing (the spec's test case 1).
H = int.from_bytes(bytes.fromhex("66e94bd4ef8a2c3b884cfa59ca342b2e"), "big")
E_J0 = bytes.fromhex("58e2fccefa7e3061367f1d57a4e7455a")


def _gf_mult(x: int, y: int) -> int:
    """Multiplication in GCM's GF(2^128) (SP 800-38D, algorithm 1: bit 0 is the leftmost)."""
    z, v = 0, y
    for i in range(127, -1, -1):
        if x >> i & 1:
            z ^= v
        v = (v >> 1) ^ (0xE1 << 120) if v & 1 else v >> 1
    return z


def _gmac_zero_key(aad: bytes) -> bytes:
    padded = aad + bytes(-len(aad) % 16) + (8 * len(aad)).to_bytes(8, "big") + bytes(8)
    y = 0
    for i in range(0, len(padded), 16):
        y = _gf_mult(y ^ int.from_bytes(padded[i:i + 16], "big"), H)
    return bytes(a ^ b for a, b in zip(E_J0, y.to_bytes(16, "big")))


@needs_gcm
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 100, 4099])
def test_the_tag_is_gcms_whatever_the_pieces(size):
    data = os.urandom(size)
    gmac = crypto.Gmac(bytes(16))
    want = _gmac_zero_key(data)
    assert gmac.tag(bytes(12), [data]) == want
    view = memoryview(data)
    for cuts in ([size // 3, size // 2], [1, 2, 3], [0, size]):
        cuts = sorted(min(c, size) for c in cuts)
        pieces = [view[a:b] for a, b in zip([0, *cuts], [*cuts, size])]
        assert gmac.tag(bytes(12), pieces) == want, cuts  # and the context is reset each time


@needs_gcm
def test_key_and_nonce_change_the_tag():
    data = b"x" * 1000
    tags = {crypto.Gmac(bytes(16)).tag(bytes(12), [data]), crypto.Gmac(b"\1" + bytes(15)).tag(bytes(12), [data]),
            crypto.Gmac(bytes(16)).tag(bytes(11) + b"\1", [data])}
    assert len(tags) == 3
    with pytest.raises(ValueError):
        crypto.Gmac(bytes(32))


@needs_gcm
def test_a_tag_leaves_the_gil_to_other_threads():
    """cffi releases the GIL around each call: a thread of Python code runs while 10 MB are
    tagged (the collector verifies one chunk while its writer thread writes the previous).
    With a long switch interval a thread that held the GIL would not let the other run."""
    gmac, data = crypto.Gmac(bytes(16)), memoryview(bytes(64 << 20))  # ~10 ms a tag
    count, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    thread = threading.Thread(target=spin)
    thread.start()
    interval = sys.getswitchinterval()
    try:
        time.sleep(0.01)
        # 1 s: a thread that held the GIL through these calls would keep it for all of them
        # (~20 x 10 ms); tags that leave it let the spinner in, if it gets a CPU in time (busy machine)
        sys.setswitchinterval(1.0)
        moved = []
        for _ in range(20):
            before = count[0]
            gmac.tag(bytes(12), [data])
            moved.append(count[0] - before)
            if moved[-1]:
                break
        assert max(moved) > 0, moved
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        thread.join()
