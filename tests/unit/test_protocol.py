"""The wire protocol over real sockets (loopback TCP and unix), no root needed:
the handshake proves the key both ways and agrees on a session MAC (GMAC where
libcrypto has AES-GCM, else HMAC-SHA256), every later message carries a tag,
and hostile input (wrong key, garbage, a 2 GB length prefix, replayed, reordered,
reflected or tampered frames, oversized messages, a doctored offer) is refused
while the server keeps serving."""

from __future__ import annotations

import socket
import struct
import threading
import time

import msgpack
import pytest

from vnet.protocol import AuthError, PeerUnreachableError, ProtocolError, connect, load_key, new_key
from vnet.protocol.server import Server

KEY = bytes(range(32))


@pytest.fixture(params=["tcp", "unix"])
def server(request, tmp_path):
    """An echo server: every message comes back with type 'echo'."""
    seen: list[str] = []

    def echo(ch):
        while True:
            msg = ch.recv()
            seen.append(msg["type"])
            ch.send({"type": "echo", "got": msg})

    addr = "127.0.0.1:0" if request.param == "tcp" else f"unix:{tmp_path}/agent.sock"
    srv = Server(addr, KEY, "agent", echo)
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    srv.seen = seen
    yield srv
    srv.stop()
    thread.join(timeout=5)


def _addr(srv) -> str:
    return f"unix:{srv.path}" if srv.path else srv.address


def test_round_trip_with_the_right_key(server):
    ch = connect(_addr(server), KEY, "agent")
    assert ch.session_mac == "gmac-aes128"  # libcrypto.so.3 is here: Python's hashlib loads it
    reply = ch.request({"type": "hello", "blob": b"\x00" * 1000}, ("echo",))
    assert reply["got"]["blob"] == b"\x00" * 1000
    ch.close()


def test_tcp_sessions_send_without_nagle(tmp_path):
    """Both ends turn Nagle off: every frame is one sendmsg, so it could only hold back a small
    frame (an ack, a pong) behind one not yet acknowledged, until the peer's delayed ACK (up
    to 40 ms when nothing flows back to carry it: the last acks of a burst waited so)."""
    options = []

    def handler(ch):
        options.append(ch.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        ch.send({"type": "echo"})
        ch.recv()

    srv = Server("127.0.0.1:0", KEY, "agent", handler)
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    try:
        ch = connect(srv.address, KEY, "agent")
        assert ch.recv(("echo",))["type"] == "echo"
        assert ch.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) and options == [1]
        ch.close()
    finally:
        srv.stop()
        thread.join(timeout=5)


def test_without_libcrypto_both_ends_agree_on_hmac(server, monkeypatch):
    from vnet.binding import crypto

    monkeypatch.setattr(crypto, "available", lambda: False)
    ch = connect(_addr(server), KEY, "agent")
    assert ch.session_mac == "hmac-sha256"
    assert ch.request({"type": "ping"}, ("echo",))["type"] == "echo"
    ch.close()


def _challenge(server):
    """A raw connection to `server` and the challenge it opens with (version 1's framing)."""
    s = socket.socket(socket.AF_UNIX) if server.path else socket.create_connection(
        (server.address.rsplit(":", 1)[0], int(server.address.rsplit(":", 1)[1])))
    if server.path:
        s.connect(server.path)
    s.settimeout(5)
    (n,) = struct.unpack(">I", _read_exact(s, 4))
    return s, msgpack.unpackb(_read_exact(s, n), raw=False)


def _handshake(server, choice: str, offer_seen=None):
    """A client by hand: read the challenge, choose `choice`, prove the key over the offer as
    it saw it (`offer_seen`: what a man in the middle made of it). The server's answer."""
    from vnet.protocol.channel import _mac, _negotiation

    s, challenge = _challenge(server)
    nc = b"c" * 32
    offer = challenge["macs"] if offer_seen is None else offer_seen
    auth = msgpack.packb({"type": "auth", "v": 3, "nonce": nc, "session_mac": choice,
                          "mac": _mac(KEY, b"vnet-client", challenge["nonce"], nc, _negotiation(offer, choice))},
                         use_bin_type=True)
    s.sendall(struct.pack(">I", len(auth)) + auth)
    try:
        (n,) = struct.unpack(">I", _read_exact(s, 4))
        return challenge, msgpack.unpackb(_read_exact(s, n), raw=False)
    except (ConnectionError, EOFError):
        return challenge, None  # refused without a word
    finally:
        s.close()


def test_the_session_mac_is_negotiated_and_the_negotiation_proven(server):
    """The server offers GMAC first and HMAC-SHA256; a client may take either (one without
    libcrypto takes HMAC), not something else; and the proofs cover the offer, so a man in
    the middle cannot strip GMAC from it (a downgrade) without the key."""
    challenge, reply = _handshake(server, "hmac-sha256")
    assert challenge["macs"] == ["gmac-aes128", "hmac-sha256"] and reply["type"] == "welcome"
    _, reply = _handshake(server, "crc32")
    assert reply["type"] == "error" and "not offered" in reply["message"]
    _, reply = _handshake(server, "hmac-sha256", offer_seen=["hmac-sha256"])
    assert reply["type"] == "error" and reply.get("auth") is True  # refused as a wrong key would be
    assert server.seen == []


def test_wrong_key_is_refused_and_the_server_keeps_serving(server):
    with pytest.raises(AuthError):
        connect(_addr(server), b"\x01" * 32, "agent")
    ch = connect(_addr(server), KEY, "agent")
    assert ch.request({"type": "ping"}, ("echo",))["got"]["type"] == "ping"
    ch.close()
    assert server.seen == ["ping"]  # the impostor got nothing through


def test_wrong_role_is_refused(server):
    with pytest.raises(ProtocolError, match="not a collector"):
        connect(_addr(server), KEY, "collector")


def _raw(server) -> socket.socket:
    if server.path:
        s = socket.socket(socket.AF_UNIX)
        s.connect(server.path)
    else:
        host, port = server.address.rsplit(":", 1)
        s = socket.create_connection((host, int(port)))
    s.settimeout(5)
    s.recv(4096)  # the challenge
    return s


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except (ConnectionError, TimeoutError):
        return True


@pytest.mark.parametrize("attack", [
    b"\xff\xff\xff\xff" + b"x" * 100,                   # a 4 GB frame
    struct.pack(">I", 2 << 30),                        # 2 GB, then nothing
    struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",    # not msgpack
    struct.pack(">I", 3) + msgpack.packb([1, 2]),       # not a map
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",               # something else entirely
])
def test_garbage_closes_that_connection_only(server, attack):
    s = _raw(server)
    s.sendall(attack)
    assert _closed(s)
    s.close()
    ch = connect(_addr(server), KEY, "agent")
    assert ch.request({"type": "ping"}, ("echo",))["type"] == "echo"
    ch.close()


class _Recording:
    """The channel's socket, keeping a copy of every frame sent."""

    def __init__(self, sock):
        self.sock, self.sent = sock, []

    def sendall(self, data):
        self.sent.append(data)
        return self.sock.sendall(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.mark.parametrize("how", ["replay", "tamper"])
def test_replayed_and_tampered_frames_are_refused(server, how):
    ch = connect(_addr(server), KEY, "agent")
    ch.sock = _Recording(ch.sock)
    ch.request({"type": "one"}, ("echo",))
    frame = ch.sock.sent[-1]
    if how == "tamper":  # same length, one payload byte changed, old tag
        frame = frame[:8] + bytes([frame[8] ^ 1]) + frame[9:]
    ch.sock.sendall(frame)
    with pytest.raises((ConnectionError, OSError, ProtocolError)):
        ch.recv(("echo",))
    ch.close()
    assert server.seen == ["one"]


MACS = ["gmac-aes128", "hmac-sha256"]


def _pair(limit: int = 8 << 20, session_mac: str = "gmac-aes128"):
    from vnet.protocol.channel import Channel

    a, b = socket.socketpair()
    sender, receiver = Channel(a, "pair", limit=limit), Channel(b, "pair", limit=limit)
    for ch, server in ((sender, False), (receiver, True)):
        ch._start_session(KEY, b"n" * 32, b"c" * 32, server=server, session_mac=session_mac)
    return a, b, sender, receiver


def _expected_tag(session_mac: str, seq: int, data: bytes, direction: int = 0) -> bytes:
    """The tag as the module's docstring defines it, computed apart from the channel."""
    from vnet.binding.crypto import Gmac
    from vnet.protocol.channel import _mac

    key = _mac(KEY, b"vnet-session " + session_mac.encode(), b"n" * 32, b"c" * 32)
    if session_mac == "gmac-aes128":
        return Gmac(key[:16]).tag(struct.pack(">IQ", direction, seq), [data])
    return _mac(key, (b"c2s", b"s2c")[direction], struct.pack(">Q", seq), data)


@pytest.mark.parametrize("session_mac", MACS)
def test_a_large_blob_goes_unchanged_and_unchopped(session_mac):
    """A blob (an events chunk's records) goes raw beside the message's head, sent
    from where it is, in pieces if the socket takes less: on the wire the lengths,
    the head, the blob and a tag over all of them; the other end gets it back."""
    a, b, sender, receiver = _pair(session_mac=session_mac)
    tag_bytes = 16 if session_mac == "gmac-aes128" else 32
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # sendmsg takes a little at a time
    blob = bytes(range(256)) * 8192 + b"tail"
    msg = {"type": "chunk", "seq": 5, "chunk": {"kind": "events", "seq": 5, "count": 3}}
    head = msgpack.packb(msg, use_bin_type=True)
    lengths = struct.pack(">II", 4 + len(head) + len(blob) + tag_bytes, len(head))
    tag = _expected_tag(session_mac, 0, lengths + head + blob)
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(_read_exact(b, len(lengths) + len(head) + len(blob) + tag_bytes)))
    reader.start()
    sender.send(msg, blob=memoryview(blob))
    reader.join(timeout=10)
    assert bytes(got) == lengths + head + blob + tag
    receiver._recv_seq = 1  # the first frame was read raw above
    for n in range(3):  # the receive buffer is reused: each blob is valid until the next recv
        writer = threading.Thread(target=sender.send, args=(msg,), kwargs={"blob": blob[n:]})
        writer.start()
        m = receiver.recv(("chunk",))
        assert m == msg and bytes(m.blob) == blob[n:]
        writer.join(timeout=10)
    writer = threading.Thread(target=sender.send, args=({"type": "small"},))
    writer.start()
    m = receiver.recv()
    assert m == {"type": "small"} and m.blob is None
    writer.join(timeout=10)
    a.close(), b.close()


@pytest.mark.parametrize("session_mac", MACS)
@pytest.mark.parametrize("how", ["head_len_past_end", "head_len_shifted", "blob_byte", "length_byte",
                                 "tag_byte", "too_long", "too_short"])
def test_bad_session_frames_are_refused_with_a_reason(how, session_mac):
    """Lengths that do not add up, or any byte changed (the lengths too: moving the
    head/blob boundary keeps the bytes but not the tag), close the connection."""
    a, b, sender, receiver = _pair(limit=1 << 20, session_mac=session_mac)
    tag_bytes = 16 if session_mac == "gmac-aes128" else 32
    blob = b"r" * 5000
    head = msgpack.packb({"type": "chunk", "chunk": {"kind": "events"}}, use_bin_type=True)
    frames = []
    sender.sock = _Recording(sender.sock)
    sender.sock.sendmsg = lambda parts: (frames.append(b"".join(bytes(p) for p in parts)),
                                         sum(memoryview(p).nbytes for p in parts))[1]
    sender.send({"type": "chunk", "chunk": {"kind": "events"}}, blob=blob)
    frame = bytearray(frames[0])
    length, head_len = struct.unpack(">II", frame[:8])
    assert head_len == len(head) and length == 4 + len(head) + len(blob) + tag_bytes
    if how == "head_len_past_end":
        frame[4:8] = struct.pack(">I", length)
        match = "do not add up"
    elif how == "head_len_shifted":
        frame[4:8] = struct.pack(">I", head_len + 1)
        match = "tag"
    elif how == "blob_byte":
        frame[8 + head_len + 100] ^= 1
        match = "tag"
    elif how == "length_byte":  # one byte more announced, one more sent: the tag covers L
        frame[0:4] = struct.pack(">I", length + 1)
        frame += b"x"
        match = "tag"
    elif how == "tag_byte":
        frame[-1] ^= 0x80
        match = "tag"
    elif how == "too_long":
        frame[0:4] = struct.pack(">I", (1 << 20) + 4 + tag_bytes + 1)
        match = "exceeds"
    else:
        frame[0:4] = struct.pack(">I", 4 + tag_bytes - 1)
        match = "do not add up"
    a.sendall(bytes(frame))
    with pytest.raises(ProtocolError, match=match):
        receiver.recv()
    a.close(), b.close()


@pytest.mark.parametrize("session_mac", MACS)
@pytest.mark.parametrize("how", ["reorder", "replay", "reflect", "other_session"])
def test_frames_out_of_place_are_refused(how, session_mac):
    """Each tag is bound to its direction, its sequence number and the session: frames
    delivered in another order, twice, sent back to their sender, or taken from another
    connection under the same key do not verify."""
    frames: list[bytes] = []

    def recording(ch):
        ch.sock = _Recording(ch.sock)
        ch.sock.sendall = lambda data: frames.append(bytes(data))
        return ch

    a, b, sender, receiver = _pair(session_mac=session_mac)
    recording(sender)
    sender.send({"type": "one"})
    sender.send({"type": "two"})
    if how == "reorder":
        wire = frames[1] + frames[0]
    elif how == "replay":
        wire = frames[0] + frames[0]
    elif how == "reflect":  # what the receiver itself sent as its first frame, back to it
        recording(receiver)
        receiver.send({"type": "one"})
        wire = frames[2]
    else:
        from vnet.protocol.channel import Channel

        other = Channel(a, "pair", limit=1 << 20)
        other._start_session(KEY, b"N" * 32, b"c" * 32, server=False, session_mac=session_mac)
        recording(other)
        other.send({"type": "one"})
        wire = frames[2]
    a.sendall(wire)
    if how == "replay":
        assert receiver.recv()["type"] == "one"
    with pytest.raises(AuthError, match="bad message tag"):
        receiver.recv()
    a.close(), b.close()


def _read_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        piece = sock.recv(n - len(buf))
        if not piece:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += piece
    return bytes(buf)


def test_oversized_message_is_refused_by_the_sender():
    from vnet.protocol.channel import Channel

    a, b = socket.socketpair()
    ch = Channel(a, "pair", limit=1024)
    with pytest.raises(ProtocolError, match="exceeds"):
        ch.send({"type": "big", "data": b"x" * 2048})
    a.close(), b.close()


def test_slow_handshake_does_not_block_others(server):
    s = socket.socket(socket.AF_UNIX) if server.path else socket.create_connection(
        tuple((server.address.rsplit(":", 1)[0], int(server.address.rsplit(":", 1)[1]))))
    if server.path:
        s.connect(server.path)
    start = time.monotonic()
    ch = connect(_addr(server), KEY, "agent")  # while the first peer says nothing
    assert ch.request({"type": "ping"}, ("echo",))["type"] == "echo"
    assert time.monotonic() - start < 5
    ch.close(), s.close()


def test_unreachable_and_keys(tmp_path):
    with pytest.raises(PeerUnreachableError):
        connect(f"unix:{tmp_path}/nobody.sock", KEY, "agent")
    path = new_key(tmp_path / "k")
    assert len(load_key(path)) == 32 and (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(Exception, match="exists"):
        new_key(path)
    path.chmod(0o644)
    with pytest.raises(Exception, match="readable by others"):
        load_key(path)


def test_remote_listen_needs_consent():
    with pytest.raises(Exception, match="not a loopback"):
        Server("0.0.0.0:0", KEY, "agent", lambda ch: None)


def test_a_peer_of_the_previous_version_reads_the_challenge_and_is_told(server):
    """The handshake keeps version 1's framing: an old peer can read the challenge,
    and one that answers with version 1 gets an error that says why."""
    from vnet.protocol import PROTOCOL_VERSION

    s, challenge = _challenge(server)
    assert challenge["type"] == "challenge" and challenge["v"] == PROTOCOL_VERSION == 3
    auth = msgpack.packb({"type": "auth", "v": 1, "nonce": b"n" * 32, "mac": b"m" * 32}, use_bin_type=True)
    s.sendall(struct.pack(">I", len(auth)) + auth)
    (n,) = struct.unpack(">I", _read_exact(s, 4))
    reply = msgpack.unpackb(_read_exact(s, n), raw=False)
    assert reply["type"] == "error" and "protocol version 1 not supported" in reply["message"]
    assert _closed(s)
    s.close()
