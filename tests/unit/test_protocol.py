"""The wire protocol over real sockets (loopback TCP and unix), no root needed:
the handshake proves the key both ways, every later message carries a tag,
and hostile input (wrong key, garbage, a 2 GB length prefix, replayed or
tampered frames, oversized messages) is refused while the server keeps serving."""

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
    reply = ch.request({"type": "hello", "blob": b"\x00" * 1000}, ("echo",))
    assert reply["got"]["blob"] == b"\x00" * 1000
    ch.close()


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


def test_a_large_blob_goes_unchanged_and_unchopped():
    """A message ending in a large blob (an events chunk) is sent from where it is,
    in pieces if the socket takes less: the bytes on the wire are the usual frame
    (length, packb's payload, tag over both), and the other end reads it back."""
    from vnet.protocol.channel import Channel, _mac

    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # sendmsg takes a little at a time
    sender, receiver = Channel(a, "pair", limit=8 << 20), Channel(b, "pair", limit=8 << 20)
    for ch, server in ((sender, False), (receiver, True)):
        ch._start_session(KEY, b"n" * 32, b"c" * 32, server=server)
    blob = bytes(range(256)) * 8192 + b"tail"
    msg = {"type": "chunk", "seq": 5, "data": blob}
    payload = msgpack.packb(msg, use_bin_type=True)
    tag = _mac(sender._key, b"c2s", struct.pack(">Q", 0), payload)
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(_read_exact(b, 4 + len(payload) + len(tag))))
    reader.start()
    sender.send(msg)
    reader.join(timeout=10)
    assert bytes(got) == struct.pack(">I", len(payload) + len(tag)) + payload + tag
    receiver._recv_seq = 1  # the first frame was read raw above
    writer = threading.Thread(target=sender.send, args=(msg,))  # the next one: its tag with the next number
    writer.start()
    assert receiver.recv(("chunk",))["data"] == blob
    writer.join(timeout=10)
    a.close(), b.close()


def _read_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        buf += sock.recv(n - len(buf))
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
