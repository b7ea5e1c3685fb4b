"""A hostile control channel (issue 11): generated inputs against the protocol's message
decoder and both ends of the handshake, over real sockets (no root needed).

- the decoder every frame goes through (`_unpack`): arbitrary bytes, msgpack of any shape,
  deep nesting, huge declared lengths: a ProtocolError or a message map, nothing else,
  and bounded memory;
- a server (vnet.protocol.server.Server, as agents and collectors run it) fed by a raw
  socket with arbitrary bytes and with forged handshake frames (auth messages whose
  fields have the wrong types or sizes, wrong MACs, replays of a real exchange): nobody
  ever gets a message through, and the server serves a real client afterwards;
- a client (`connect`) talking to a hostile server: it refuses in one typed error.
"""

from __future__ import annotations

import socket
import struct
import threading
import tracemalloc

import msgpack
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vnet.errors import VnetError  # noqa: E402
from vnet.protocol import connect  # noqa: E402
from vnet.protocol.channel import MAX_CONTROL_BYTES, ProtocolError, _unpack  # noqa: E402
from vnet.protocol.server import Server  # noqa: E402

KEY = bytes(range(32))
MEMORY_BOUND = 64 << 20

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(),
                    st.text(max_size=32), st.binary(max_size=64))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=5)),
                      max_leaves=25)


def _deep(depth: int, kind: str) -> bytes:
    """msgpack of `depth` nested arrays or maps, built by hand (msgpack itself would refuse)."""
    head = b"\x91" if kind == "array" else b"\x81\xa1k"
    return head * depth + b"\xc0"


def _huge_length(kind: int) -> bytes:
    """A str/bin/array/map header that declares 4 GiB of content."""
    return bytes([kind]) + b"\xff\xff\xff\xff" + b"x" * 16


payloads = st.one_of(
    st.binary(max_size=300),
    values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.dictionaries(st.sampled_from(["type", "v", "nonce", "mac", "role", "seq", "data", "macs", "session_mac"]),
                    values, max_size=5)
      .map(lambda d: msgpack.packb(d, use_bin_type=True)),
    st.tuples(st.integers(1, 20_000), st.sampled_from(["array", "map"])).map(lambda t: _deep(*t)),
    st.sampled_from([0xdb, 0xc6, 0xdd, 0xdf]).map(_huge_length),
)


@settings(max_examples=4000, deadline=2000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(payload=payloads)
def test_the_decoder_returns_a_message_or_a_protocol_error(payload):
    tracemalloc.start()
    try:
        try:
            msg = _unpack(payload, MAX_CONTROL_BYTES)
        except ProtocolError:
            return
        assert isinstance(msg, dict) and isinstance(msg["type"], str)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < MEMORY_BOUND


@pytest.fixture(scope="module")
def server():
    """A real server whose handler records every message that got through the handshake."""
    got: list[dict] = []

    def handler(ch):
        while True:
            got.append(ch.recv())
            ch.send({"type": "echo"})

    srv = Server("127.0.0.1:0", KEY, "agent", handler)
    thread = threading.Thread(target=srv.serve, daemon=True)
    thread.start()
    srv.got = got
    yield srv
    srv.stop()
    thread.join(timeout=5)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _auth_forgeries():
    """What an impostor can send after reading the challenge: auth maps of every wrong shape."""
    field = st.one_of(values, st.binary(min_size=32, max_size=32))
    return st.fixed_dictionaries({"type": st.sampled_from(["auth", "hello", "start", "chunk"])},
                                 optional={"v": st.one_of(st.integers(0, 4), values), "nonce": field,
                                           "mac": field, "session_mac": st.one_of(
                                               st.sampled_from(["gmac-aes128", "hmac-sha256"]), values)}).map(lambda d: _frame(msgpack.packb(d, use_bin_type=True)))


attacks = st.one_of(
    st.binary(max_size=200),
    payloads.map(_frame),
    _auth_forgeries(),
    st.lists(_auth_forgeries(), min_size=2, max_size=3).map(b"".join),
    st.integers(0, 0xFFFFFFFF).map(lambda n: struct.pack(">I", n) + b"\x00" * 8),
)


@settings(max_examples=1500, deadline=5000, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                                        HealthCheck.function_scoped_fixture])
@given(attack=attacks)
def test_nobody_gets_a_message_through_without_the_key(server, attack):
    with socket.create_connection(server.address_tuple if hasattr(server, "address_tuple") else
                                  _host_port(server.address), timeout=5) as s:
        s.settimeout(2)
        try:
            s.recv(4096)  # the challenge
            s.sendall(attack)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):  # whatever it says (an error), until it closes
                pass
        except OSError:
            pass  # reset by the server: refused
    assert server.got == [], server.got


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def test_after_all_that_the_server_still_serves(server):
    ch = connect(server.address, KEY, "agent")
    assert ch.request({"type": "ping"}, ("echo",))["type"] == "echo"
    ch.close()
    assert [m["type"] for m in server.got] == ["ping"]
    server.got.clear()


@settings(max_examples=600, deadline=5000, derandomize=True)
@given(reply=attacks)
def test_a_client_refuses_a_hostile_server_in_one_typed_error(reply):
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]

    def serve():
        try:
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(2)
                conn.sendall(reply)
                try:
                    conn.recv(4096)
                except OSError:
                    pass
        except OSError:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(VnetError):
            connect(f"127.0.0.1:{port}", KEY, "agent", timeout=2)
    finally:
        lsock.close()
        t.join(timeout=5)
