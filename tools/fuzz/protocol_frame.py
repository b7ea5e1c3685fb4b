#!/usr/bin/env python3
"""Coverage-guided fuzzing of the session frame decoder (vnet/protocol/channel.py) over
a real socket pair: what reaches recv() is a Message or a ProtocolError (AuthError
included) or a closed connection; anything else is a finding.

The first input byte chooses what the rest is: raw bytes on the wire after the
handshake (lengths, limits, the tag refuses them), or a frame a peer holding the key
sends with the right tag around the fuzzer's head and blob (split at the first
0xff 0xff), so that the fuzzer reaches the msgpack decoder and the message checks
behind the tag: an authenticated but hostile peer.

    python tools/fuzz/protocol_frame.py -max_total_time=180
"""

from __future__ import annotations

import socket

import atheris

from common import run

with atheris.instrument_imports():
    from vnet.protocol.channel import Channel, ProtocolError, session_macs

KEY = bytes(range(32))
LIMIT = 1 << 16


def pair() -> tuple[Channel, Channel, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.settimeout(2.0)
    sender, receiver = Channel(a, "fuzzer", LIMIT), Channel(b, "receiver", LIMIT)
    ns, nc = b"n" * 32, b"c" * 32
    mac = session_macs()[0]  # the one sessions use here: GMAC where libcrypto has AES-GCM
    sender._start_session(KEY, ns, nc, server=False, session_mac=mac)
    receiver._start_session(KEY, ns, nc, server=True, session_mac=mac)
    return sender, receiver, a


def test_one(data: bytes) -> None:
    if not data:
        return
    sender, receiver, raw = pair()
    try:
        if data[0] & 1:
            raw.sendall(data[1:])
        else:
            head, _, blob = data[1:].partition(b"\xff\xff")
            sender._send_frame(head, blob or None)
        raw.shutdown(socket.SHUT_WR)
        while True:
            try:
                msg = receiver.recv()
            except (ProtocolError, ConnectionError):
                return
            assert isinstance(msg, dict) and isinstance(msg["type"], str)
    finally:
        sender.close()
        receiver.close()


if __name__ == "__main__":
    import msgpack

    run(test_one, [b"\x00" + msgpack.packb({"type": "chunk", "seq": 1, "chunk": {"kind": "events"}}) + b"\xff\xffrec",
                   b"\x01" + b"\x00\x00\x00\x30\x00\x00\x00\x04" + b"\x00" * 48], default_max_len=8192)
