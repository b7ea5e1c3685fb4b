"""One authenticated connection: frames, the handshake, and message checks.

Frame: u32 big-endian length of the payload, the payload (one msgpack map),
and after the handshake a 32-byte HMAC-SHA256 tag over (direction, sequence
number, payload) with a key derived from both sides' nonces. A frame longer
than the channel's limit, a payload that is not a map with a known `type`, a
bad tag or a message out of order closes the connection with a logged reason.

Handshake (both directions proven, nothing secret on the wire):
    server -> {"type": "challenge", "v": 1, "nonce": Ns, "role": R}
    client -> {"type": "auth", "v": 1, "nonce": Nc, "mac": HMAC(K, "vnet-client" Ns Nc)}
    server -> {"type": "welcome", "mac": HMAC(K, "vnet-server" Nc Ns)}
Session key: HMAC(K, "vnet-session" Ns Nc). No confidentiality: events cross
the wire in clear (use a private network or a tunnel where that matters).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import socket
import stat
import struct
import threading
from pathlib import Path

import msgpack

from vnet.errors import UsageError, VnetError
from vnet.packing import pack_parts, parts_size

log = logging.getLogger("vnet.protocol")

PROTOCOL_VERSION = 1
MAX_CONTROL_BYTES = 1 << 20     # hello, start, status...: a control package is a few KiB
MAX_DATA_BYTES = 32 << 20       # an events chunk (ring batches are capped well below)
HANDSHAKE_BYTES = 4096
TAG_BYTES = 32
NONCE_BYTES = 32
KEY_BYTES = 32
DEFAULT_TIMEOUT = 30.0


class ProtocolError(VnetError):
    """The peer broke the protocol; the connection is closed."""

    exit_code = 10


class AuthError(ProtocolError):
    """Wrong or missing key (or a peer that is not vnet)."""

    exit_code = 11


class PeerUnreachableError(VnetError):
    """Nothing answers at the address (not running, wrong address, network cut)."""

    exit_code = 12


# -- keys --------------------------------------------------------------------------------------------

def new_key(path: str | os.PathLike, force: bool = False) -> Path:
    """Write a fresh random key (hex, mode 0600). Refuses to overwrite unless forced."""
    path = Path(path)
    if path.exists() and not force:
        raise UsageError(f"{path} exists: not overwriting a key (use --force)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
    os.chmod(path, 0o600)
    return path


def load_key(path: str | os.PathLike) -> bytes:
    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read key {path}: {e.strerror}",
                         hint="create one with 'vnet agent init --key FILE' and copy it to every host") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"key {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o})",
                         hint=f"chmod 600 {path}")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise UsageError(f"key {path} is not a vnet key (hex, at least 16 bytes)")
    return key


# -- addresses ---------------------------------------------------------------------------------------

def parse_address(text: str, listen: bool = False) -> tuple[int, object]:
    """'host:port', '[v6]:port' or 'unix:/path' -> (family, sockaddr). Port 0
    (any free port) only for listening."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise UsageError(f"address {text!r}: a unix socket path must be absolute")
        return socket.AF_UNIX, path
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 if listen else 1) <= int(port) < 65536:
        raise UsageError(f"address {text!r}: use HOST:PORT, [IPV6]:PORT or unix:/PATH")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return family, (host, int(port))


def is_loopback(sockaddr) -> bool:
    import ipaddress

    if isinstance(sockaddr, str):
        return True
    try:
        return ipaddress.ip_address(sockaddr[0]).is_loopback
    except ValueError:
        return sockaddr[0] == "localhost"


# -- the channel -------------------------------------------------------------------------------------

def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, label + b"".join(parts), hashlib.sha256).digest()


def _unpack(payload: bytes, limit: int):
    """One msgpack object with every container and string bounded by `limit`."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=max(limit, 1),
                                max_str_len=limit, max_bin_len=limit, max_array_len=limit // 2 + 16,
                                max_map_len=limit // 4 + 16, max_ext_len=0)
    unpacker.feed(payload)
    try:
        obj = unpacker.unpack()
    except msgpack.OutOfData:
        raise ProtocolError("truncated msgpack payload") from None
    except Exception as e:  # noqa: BLE001 - any decoder complaint is a protocol error
        raise ProtocolError(f"malformed msgpack payload: {type(e).__name__}: {e}") from None
    try:
        unpacker.unpack()
    except msgpack.OutOfData:
        pass
    except Exception:  # noqa: BLE001 - malformed trailing bytes are trailing bytes all the same
        raise ProtocolError("trailing data after the message") from None
    else:
        raise ProtocolError("trailing data after the message")
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("a message must be a map with a string 'type'")
    return obj


class Channel:
    """A connected, authenticated peer. send()/recv() are each thread-safe."""

    def __init__(self, sock: socket.socket, peer: str, limit: int):
        self.sock = sock
        self.peer = peer
        self.limit = limit
        self._key: bytes | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self._send_label = b""
        self._recv_label = b""
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self.closed = False

    def __repr__(self) -> str:
        return f"<Channel {self.peer}>"

    # -- raw frames --------------------------------------------------------------------------------
    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError(f"{self.peer} closed the connection")
            buf += chunk
        return bytes(buf)

    def _send_frame(self, payload: bytes, blob: memoryview | None = None) -> None:
        """One frame: payload (+ blob, the large last value vnet.packing left out of it) + tag."""
        if blob is None:
            if self._key is not None:
                tag = _mac(self._key, self._send_label, struct.pack(">Q", self._send_seq), payload)
                self._send_seq += 1
                payload += tag
            self.sock.sendall(struct.pack(">I", len(payload)) + payload)
            return
        # An events chunk (~10 MB): sent from where it is with one sendmsg, the tag computed
        # over the pieces in turn; the same bytes as above without copying the chunk twice.
        tag = b""
        if self._key is not None:
            mac = hmac.new(self._key, self._send_label + struct.pack(">Q", self._send_seq), hashlib.sha256)
            mac.update(payload)
            mac.update(blob)
            tag = mac.digest()
            self._send_seq += 1
        parts = [memoryview(struct.pack(">I", len(payload) + blob.nbytes + len(tag)) + payload), blob]
        if tag:
            parts.append(memoryview(tag))
        while parts:
            n = self.sock.sendmsg(parts)
            while parts and n >= parts[0].nbytes:
                n -= parts.pop(0).nbytes
            if n:
                parts[0] = parts[0][n:]

    def _recv_frame(self, limit: int) -> bytes:
        (length,) = struct.unpack(">I", self._recv_exact(4))
        extra = TAG_BYTES if self._key is not None else 0
        if length > limit + extra:
            raise ProtocolError(f"frame of {length} bytes from {self.peer} exceeds the limit of {limit + extra}")
        frame = self._recv_exact(length)
        if self._key is None:
            return frame
        if length < TAG_BYTES:
            raise ProtocolError(f"frame from {self.peer} too short for its tag")
        payload, tag = frame[:-TAG_BYTES], frame[-TAG_BYTES:]
        want = _mac(self._key, self._recv_label, struct.pack(">Q", self._recv_seq), payload)
        if not hmac.compare_digest(tag, want):
            raise AuthError(f"bad message tag from {self.peer} (tampered, replayed or out of order)")
        self._recv_seq += 1
        return payload

    # -- messages ----------------------------------------------------------------------------------
    def send(self, msg: dict) -> None:
        payload, blob = pack_parts(msg)
        size = parts_size(payload, blob)
        if size > self.limit:
            raise ProtocolError(f"message {msg.get('type')} of {size} bytes exceeds {self.limit}")
        with self._send_lock:
            self._send_frame(payload, blob)

    def recv(self, expect: tuple[str, ...] | None = None, limit: int | None = None) -> dict:
        """The next message; `expect`: the types allowed here (anything else is out of order)."""
        with self._recv_lock:
            msg = _unpack(self._recv_frame(limit or self.limit), limit or self.limit)
        if msg["type"] == "error" and (expect is None or "error" not in expect):
            raise ProtocolError(f"{self.peer}: {msg.get('message', 'error')}")
        if expect is not None and msg["type"] not in expect:
            raise ProtocolError(f"unexpected {msg['type']!r} from {self.peer} (expected {', '.join(expect)})")
        return msg

    def request(self, msg: dict, expect: tuple[str, ...]) -> dict:
        self.send(msg)
        return self.recv(expect)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    # -- handshake ---------------------------------------------------------------------------------
    def _start_session(self, key: bytes, ns: bytes, nc: bytes, server: bool) -> None:
        self._key = _mac(key, b"vnet-session", ns, nc)
        mine, theirs = (b"s2c", b"c2s") if server else (b"c2s", b"s2c")
        self._send_label, self._recv_label = mine, theirs


def accept(sock: socket.socket, peer: str, key: bytes, role: str, limit: int = MAX_CONTROL_BYTES,
           timeout: float = DEFAULT_TIMEOUT) -> Channel:
    """Server side of the handshake on a freshly accepted socket."""
    sock.settimeout(timeout)
    ch = Channel(sock, peer, limit)
    ns = secrets.token_bytes(NONCE_BYTES)
    ch.send({"type": "challenge", "v": PROTOCOL_VERSION, "nonce": ns, "role": role})
    msg = ch.recv(("auth",), limit=HANDSHAKE_BYTES)
    if msg.get("v") != PROTOCOL_VERSION:
        ch.send({"type": "error", "message": f"protocol version {msg.get('v')} not supported "
                                             f"(this end speaks {PROTOCOL_VERSION})"})
        raise ProtocolError(f"{peer} speaks protocol version {msg.get('v')}")
    nc, mac = msg.get("nonce"), msg.get("mac")
    if not isinstance(nc, bytes) or len(nc) != NONCE_BYTES or not isinstance(mac, bytes):
        raise ProtocolError(f"malformed auth message from {peer}")
    if not hmac.compare_digest(mac, _mac(key, b"vnet-client", ns, nc)):
        raise AuthError(f"{peer} failed authentication (wrong key)")
    ch.send({"type": "welcome", "mac": _mac(key, b"vnet-server", nc, ns)})
    ch._start_session(key, ns, nc, server=True)
    return ch


def connect(address: str, key: bytes, role: str, limit: int = MAX_CONTROL_BYTES,
            timeout: float = DEFAULT_TIMEOUT) -> Channel:
    """Client side: connect to `address` and prove, and check, the key. `role`:
    what the server must be ("agent" or "collector")."""
    family, sockaddr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(sockaddr)
    except OSError as e:
        sock.close()
        raise PeerUnreachableError(f"cannot connect to {address}: {e.strerror or e}",
                                   hint=f"is a vnet {role} listening there?") from None
    ch = Channel(sock, address, limit)
    try:
        msg = ch.recv(("challenge",), limit=HANDSHAKE_BYTES)
        if msg.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(f"{address} speaks protocol version {msg.get('v')}, this end {PROTOCOL_VERSION}")
        if msg.get("role") != role:
            raise ProtocolError(f"{address} is a vnet {msg.get('role')}, not a {role}")
        ns = msg.get("nonce")
        if not isinstance(ns, bytes) or len(ns) != NONCE_BYTES:
            raise ProtocolError(f"malformed challenge from {address}")
        nc = secrets.token_bytes(NONCE_BYTES)
        ch.send({"type": "auth", "v": PROTOCOL_VERSION, "nonce": nc, "mac": _mac(key, b"vnet-client", ns, nc)})
        reply = ch.recv(("welcome", "error"), limit=HANDSHAKE_BYTES)
        if reply["type"] == "error":
            raise ProtocolError(f"{address}: {reply.get('message')}")
        if not hmac.compare_digest(reply.get("mac") or b"", _mac(key, b"vnet-server", nc, ns)):
            raise AuthError(f"{address} could not prove it has the key")
        ch._start_session(key, ns, nc, server=False)
        return ch
    except (ConnectionError, OSError) as e:
        ch.close()
        raise AuthError(f"{address} closed the connection during authentication (wrong key?): {e}") from None
    except BaseException:
        ch.close()
        raise
