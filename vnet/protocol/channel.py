"""One authenticated connection: frames, the handshake, and message checks.

Handshake frames (as in protocol version 1, so that a peer of another version can
still read the challenge and say which version it speaks): u32 big-endian length
of the payload, the payload (one msgpack map).

After the handshake (version 3), every frame:
    u32 BE  L     the length of everything after this field
    u32 BE  H     the length of the head
    H bytes head  one msgpack map with a string "type"
    blob          L - 4 - H - T raw bytes, possibly none (an events chunk's records,
                  shipped beside the head rather than inside it, so that neither end
                  copies them into or out of msgpack)
    T bytes tag   the session MAC over (L, H, head, blob) for this direction and u64
                  sequence number, one of (negotiated in the handshake):
                  gmac-aes128  T = 16: AES-128-GCM's tag, everything associated data,
                               nonce = u32 direction (0 client->server, 1 back) + u64 seq
                  hmac-sha256  T = 32: HMAC-SHA256(key, direction label, u64 seq, L, H, head, blob)
Every byte, the lengths included, is under the tag. A frame longer than the
channel's limit, a head that is not a map with a known `type`, lengths that do not
add up, a bad tag or a message out of order closes the connection with a logged
reason. A received blob is a memoryview of the channel's receive buffer: valid
until the next recv() on that channel.

Handshake (both directions proven, nothing secret on the wire):
    server -> {"type": "challenge", "v": 3, "nonce": Ns, "role": R, "macs": OFFER}
    client -> {"type": "auth", "v": 3, "nonce": Nc, "session_mac": M,
               "mac": HMAC(K, "vnet-client" Ns Nc N)}
    server -> {"type": "welcome", "mac": HMAC(K, "vnet-server" Nc Ns N)}
OFFER: the session MACs the server can compute, best first; M: the first of them the client
can (GMAC where libcrypto with AES-GCM loads, else HMAC-SHA256: vnet.binding.crypto);
N = msgpack [OFFER, M], so both proofs cover the negotiation. Session key (per connection:
Ns is fresh, so a (key, nonce) pair never repeats): HMAC(K, "vnet-session " M, Ns Nc),
its first 16 bytes for GMAC. No confidentiality: events cross the wire in clear (use a
private network or a tunnel where that matters).
"""

from __future__ import annotations

import contextlib
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

log = logging.getLogger("vnet.protocol")

PROTOCOL_VERSION = 3             # 2: a raw blob beside the head; 3: the session MAC negotiated (GMAC)
MAX_CONTROL_BYTES = 1 << 20     # hello, start, status...: a control package is a few KiB
MAX_DATA_BYTES = 32 << 20       # an events chunk (ring batches are capped well below)
HANDSHAKE_BYTES = 4096
NONCE_BYTES = 32
KEY_BYTES = 32
DEFAULT_TIMEOUT = 30.0
KEY_HINT = "every host needs the same key file: copy the one 'vnet agent init' wrote"
# A peer that vanishes without a FIN or RST (network cut, host gone) is noticed within
# about KEEPALIVE_IDLE_S + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL_S when the line is idle, and
# USER_TIMEOUT_S after the first unacknowledged byte otherwise, instead of TCP's ~15 minutes.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 4
USER_TIMEOUT_S = 30
_LENGTHS = struct.Struct(">II")  # L, H of a session frame
_SEQ = struct.Struct(">Q")
REUSE_BYTES = 1 << 16            # frames this large are read into the channel's buffer, reused


class ProtocolError(VnetError):
    """The peer broke the protocol; the connection is closed."""

    exit_code = 10


class AuthError(ProtocolError):
    """Wrong or missing key (or a peer that is not vnet)."""

    exit_code = 11


class RemoteError(ProtocolError):
    """The peer refused a request with an error message: its text and exit code carried
    over (a dispatcher exits as the agent would have: 4 for an interface not there)."""

    def __init__(self, message: str, exit_code=None, *, peer: str = ""):
        super().__init__(message)
        self.peer = peer
        # an authenticated peer's number, still bounded to what an exit status can be
        if isinstance(exit_code, int) and not isinstance(exit_code, bool) and 1 <= exit_code <= 125:
            self.exit_code = exit_code


class PeerClosed(ConnectionError):
    """The peer closed the connection in order (end of stream): its process ended or let go of
    us. Never a network cut, which ends in silence, a timeout or a reset."""


class PeerUnreachableError(VnetError):
    """Nothing answers at the address (not running, wrong address, network cut)."""

    exit_code = 12
    errno: int | None = None   # the connect's, when that is what failed


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


def tcp_options(sock: socket.socket) -> None:
    """On a TCP socket (nothing on a unix one): keepalive and a user timeout, and no Nagle.
    Every frame goes out in one sendmsg, so Nagle only delays: a small frame (an ack, a pong)
    after one the peer has not yet acknowledged waited for its delayed ACK, up to 40 ms, when
    no data flowed back to carry that ACK (the last acks of a burst: drain.py)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                       ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", USER_TIMEOUT_S * 1000)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


# -- session MACs ------------------------------------------------------------------------------------

class _HmacSha256:
    """The fallback, and version 2's MAC: HMAC-SHA256 (~1.4 GB/s here)."""

    name = "hmac-sha256"
    tag_bytes = 32

    def __init__(self, key: bytes, direction: int):
        self._key, self._label = key, (b"c2s", b"s2c")[direction]

    def tag(self, seq: int, pieces) -> bytes:
        mac = hmac.new(self._key, self._label + _SEQ.pack(seq), hashlib.sha256)
        for piece in pieces:
            mac.update(piece)
        return mac.digest()


class _Gmac:
    """GMAC (AES-128-GCM, no plaintext) through libcrypto: ~7x HMAC-SHA256's speed here."""

    name = "gmac-aes128"
    tag_bytes = 16

    def __init__(self, key: bytes, direction: int):
        from vnet.binding.crypto import Gmac

        self._gmac, self._direction = Gmac(key[:16]), _DIRECTION.pack(direction)

    def tag(self, seq: int, pieces) -> bytes:
        return self._gmac.tag(self._direction + _SEQ.pack(seq), pieces)


_DIRECTION = struct.Struct(">I")
SESSION_MACS = {m.name: m for m in (_Gmac, _HmacSha256)}


def session_macs() -> list[str]:
    """The session MACs this end can compute, best first: the one place that probes for them."""
    from vnet.binding import crypto

    return [name for name in SESSION_MACS if name != _Gmac.name or crypto.available()]


def _negotiation(offer: list, choice: str) -> bytes:
    return msgpack.packb([offer, choice], use_bin_type=True)


# -- the channel -------------------------------------------------------------------------------------

def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, label + b"".join(parts), hashlib.sha256).digest()


def _unpack(payload, limit: int) -> "Message":
    """One msgpack map (bytes or a memoryview) with every container and string bounded by `limit`."""
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_str_len=limit, max_bin_len=limit,
                              max_array_len=limit // 2 + 16, max_map_len=limit // 4 + 16, max_ext_len=0)
    except msgpack.ExtraData:
        raise ProtocolError("trailing data after the message") from None
    except (msgpack.OutOfData, ValueError) as e:
        if isinstance(e, msgpack.OutOfData) or "incomplete" in str(e).lower():
            raise ProtocolError("truncated msgpack payload") from None
        raise ProtocolError(f"malformed msgpack payload: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any decoder complaint is a protocol error
        raise ProtocolError(f"malformed msgpack payload: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("a message must be a map with a string 'type'")
    return Message(obj)


class Message(dict):
    """A received message; `blob`: the raw bytes that came beside it (a memoryview
    of the channel's receive buffer, valid until its next recv()), or None. With the
    channel's `buffers` set, `buffer` is the one taken from them for this frame: the
    blob stays valid until it is given back."""

    blob: memoryview | None = None
    buffer: bytearray | None = None


class BufferRing:
    """Receive buffers in rotation, for a reader that hands blobs to another thread (the
    collector's writer) instead of using each before its next recv(): a large frame is
    received into a free one, which is reused only once given back. With all of them out
    the reader waits: `count` bounds the frames in flight and the memory."""

    def __init__(self, count: int):
        self._free = [bytearray() for _ in range(count)]
        self._cond = threading.Condition()
        self._aborted: BaseException | None = None

    def take(self, n: int) -> bytearray:
        with self._cond:
            while not self._free and self._aborted is None:
                self._cond.wait()
            if self._aborted is not None:
                raise self._aborted
            buf = self._free.pop()
        if len(buf) < n:  # grown while nobody holds a view of it
            buf = bytearray(max(n, 2 * len(buf)))
        return buf

    def give(self, buf: bytearray) -> None:
        with self._cond:
            self._free.append(buf)
            self._cond.notify()

    def abort(self, error: BaseException) -> None:
        """The taker is gone: whoever waits for a buffer gets `error`."""
        with self._cond:
            self._aborted = error
            self._cond.notify_all()


class Channel:
    """A connected, authenticated peer. send()/recv() are each thread-safe."""

    def __init__(self, sock: socket.socket, peer: str, limit: int):
        self.sock = sock
        self.peer = peer
        self.limit = limit
        self._key: bytes | None = None   # the session key: None during the handshake
        self._send_mac = self._recv_mac = None
        self.session_mac = ""            # its name, once negotiated
        self._send_seq = 0
        self._recv_seq = 0
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._rbuf = bytearray()
        self.buffers: BufferRing | None = None  # set: large frames go to these, see Message.buffer
        self._taken: bytearray | None = None
        self.closed = False

    def __repr__(self) -> str:
        return f"<Channel {self.peer}>"

    # -- raw frames --------------------------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> None:
        got, n = 0, view.nbytes
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if not k:
                raise PeerClosed(f"{self.peer} closed the connection")
            got += k

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _buffer(self, n: int) -> memoryview:
        """n bytes to receive into: a large frame reuses the channel's buffer (no fresh
        pages to fault in per chunk); a new one when it must grow (old views stay valid)."""
        if n < REUSE_BYTES:
            return memoryview(bytearray(n))
        if self.buffers is not None:
            self._taken = self.buffers.take(n)
            return memoryview(self._taken)[:n]
        if len(self._rbuf) < n:
            self._rbuf = bytearray(max(n, 2 * len(self._rbuf)))
        return memoryview(self._rbuf)[:n]

    def _sendmsg_all(self, parts: list) -> None:
        parts = [memoryview(p).cast("B") for p in parts if len(p)]
        while parts:
            n = self.sock.sendmsg(parts)
            while parts and n >= parts[0].nbytes:
                n -= parts.pop(0).nbytes
            if n:
                parts[0] = parts[0][n:]

    def _send_frame(self, head: bytes, blob=None) -> None:
        """A handshake frame (no session yet: head only), or a session frame: lengths,
        head, blob (sent from where it is: one sendmsg, no copy) and the tag over all of it."""
        if self._key is None:
            if blob is not None:
                raise ProtocolError("no blob before the session starts")
            self.sock.sendall(struct.pack(">I", len(head)) + head)
            return
        blob = memoryview(blob).cast("B") if blob is not None else memoryview(b"")
        lengths = _LENGTHS.pack(4 + len(head) + blob.nbytes + self._send_mac.tag_bytes, len(head))
        tag = self._send_mac.tag(self._send_seq, (lengths, head, blob))
        self._send_seq += 1
        if blob.nbytes:
            self._sendmsg_all([lengths + head, blob, tag])
        else:
            self.sock.sendall(lengths + head + tag)

    def _recv_message(self, limit: int) -> "Message":
        if self._key is None:  # the handshake's frames
            (length,) = struct.unpack(">I", self._recv_exact(4))
            if length > limit:
                raise ProtocolError(f"frame of {length} bytes from {self.peer} exceeds the limit of {limit}")
            return _unpack(self._recv_exact(length), limit)
        lengths = self._recv_exact(_LENGTHS.size)
        length, head_len = _LENGTHS.unpack(lengths)
        tag_bytes = self._recv_mac.tag_bytes
        if length > 4 + limit + tag_bytes:
            raise ProtocolError(f"frame of {length} bytes from {self.peer} exceeds the limit of "
                                f"{4 + limit + tag_bytes}")
        if length < 4 + tag_bytes or head_len > length - 4 - tag_bytes:
            raise ProtocolError(f"frame from {self.peer}: lengths {length}/{head_len} do not add up")
        self._taken = None
        body = self._buffer(length - 4)
        taken, self._taken = self._taken, None
        try:
            self._recv_into(body)
            head, blob, tag = body[:head_len], body[head_len:-tag_bytes], body[-tag_bytes:]
            if not hmac.compare_digest(tag, self._recv_mac.tag(self._recv_seq, (lengths, head, blob))):
                raise AuthError(f"bad message tag from {self.peer} (tampered, replayed or out of order)")
            self._recv_seq += 1
            msg = _unpack(head, limit)
        except BaseException:
            if taken is not None:
                self.buffers.give(taken)
            raise
        if blob.nbytes:
            msg.blob = blob
        if taken is not None:
            msg.buffer = taken
        return msg

    # -- messages ----------------------------------------------------------------------------------
    def send(self, msg: dict, blob=None) -> None:
        """One message; `blob`: raw bytes (any buffer) sent beside it, not copied (msg.blob there)."""
        head = msgpack.packb(msg, use_bin_type=True)
        size = len(head) + (memoryview(blob).nbytes if blob is not None else 0)
        if size > self.limit:
            raise ProtocolError(f"message {msg.get('type')} of {size} bytes exceeds {self.limit}")
        with self._send_lock:
            self._send_frame(head, blob)

    def recv(self, expect: tuple[str, ...] | None = None, limit: int | None = None) -> "Message":
        """The next message; `expect`: the types allowed here (anything else is out of order)."""
        with self._recv_lock:
            msg = self._recv_message(limit or self.limit)
        if msg["type"] == "error" and (expect is None or "error" not in expect):
            text = msg.get("message")
            raise RemoteError(text if isinstance(text, str) and text else f"{self.peer}: error",
                              msg.get("exit_code"), peer=self.peer)
        if expect is not None and msg["type"] not in expect:
            raise ProtocolError(f"unexpected {msg['type']!r} from {self.peer} (expected {', '.join(expect)})")
        return msg

    def request(self, msg: dict, expect: tuple[str, ...], timeout: float | None = None) -> dict:
        """Send, and the reply. `timeout`: for this exchange instead of the socket's own; one
        that expires may leave a frame half read: the channel is then to be closed."""
        if timeout is None:
            self.send(msg)
            return self.recv(expect)
        before = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            self.send(msg)
            return self.recv(expect)
        finally:
            with contextlib.suppress(OSError):  # closed meanwhile
                self.sock.settimeout(before)

    def abort(self) -> None:
        """Close with a reset, not an orderly end: a peer cut off from us must not take the FIN
        that TCP would deliver once the line is back for our process having ended."""
        if not self.closed:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.closed = True
            self.sock.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()

    # -- handshake ---------------------------------------------------------------------------------
    def _start_session(self, key: bytes, ns: bytes, nc: bytes, server: bool, session_mac: str) -> None:
        cls = SESSION_MACS[session_mac]
        self._key = _mac(key, b"vnet-session " + session_mac.encode(), ns, nc)
        mine, theirs = (1, 0) if server else (0, 1)  # the direction: a nonce of one never is one of the other
        self._send_mac, self._recv_mac = cls(self._key, mine), cls(self._key, theirs)
        self.session_mac = session_mac


def accept(sock: socket.socket, peer: str, key: bytes, role: str, limit: int = MAX_CONTROL_BYTES,
           timeout: float = DEFAULT_TIMEOUT) -> Channel:
    """Server side of the handshake on a freshly accepted socket."""
    sock.settimeout(timeout)
    tcp_options(sock)
    ch = Channel(sock, peer, limit)
    ns = secrets.token_bytes(NONCE_BYTES)
    offer = session_macs()
    ch.send({"type": "challenge", "v": PROTOCOL_VERSION, "nonce": ns, "role": role, "macs": offer})
    msg = ch.recv(("auth",), limit=HANDSHAKE_BYTES)
    if msg.get("v") != PROTOCOL_VERSION:
        ch.send({"type": "error", "message": f"protocol version {msg.get('v')} not supported "
                                             f"(this end speaks {PROTOCOL_VERSION})"})
        raise ProtocolError(f"{peer} speaks protocol version {msg.get('v')}")
    nc, mac, choice = msg.get("nonce"), msg.get("mac"), msg.get("session_mac")
    if not isinstance(nc, bytes) or len(nc) != NONCE_BYTES or not isinstance(mac, bytes):
        raise ProtocolError(f"malformed auth message from {peer}")
    if choice not in offer:
        ch.send({"type": "error", "message": f"session MAC {choice!r} not offered (this end: {', '.join(offer)})"})
        raise ProtocolError(f"{peer} chose session MAC {choice!r}, not one of {', '.join(offer)}")
    agreed = _negotiation(offer, choice)
    if not hmac.compare_digest(mac, _mac(key, b"vnet-client", ns, nc, agreed)):
        # said, not only dropped: the client can tell a wrong key from a server that went away
        ch.send({"type": "error", "message": "authentication failed (wrong key)", "auth": True})
        raise AuthError(f"{peer} failed authentication (wrong key)")
    ch.send({"type": "welcome", "mac": _mac(key, b"vnet-server", nc, ns, agreed)})
    ch._start_session(key, ns, nc, server=True, session_mac=choice)
    return ch


def connect(address: str, key: bytes, role: str, limit: int = MAX_CONTROL_BYTES,
            timeout: float = DEFAULT_TIMEOUT) -> Channel:
    """Client side: connect to `address` and prove, and check, the key. `role`:
    what the server must be ("agent" or "collector")."""
    family, sockaddr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    tcp_options(sock)
    try:
        sock.connect(sockaddr)
    except OSError as e:
        sock.close()
        err = PeerUnreachableError(f"cannot connect to {address}: {e.strerror or e}",
                                   hint=f"is a vnet {role} listening there?")
        err.errno = e.errno  # refused (nothing listens) is not the same as no answer (a cut line)
        raise err from None
    ch = Channel(sock, address, limit)
    try:
        msg = ch.recv(("challenge",), limit=HANDSHAKE_BYTES)
        if msg.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(f"{address} speaks protocol version {msg.get('v')}, this end {PROTOCOL_VERSION}")
        if msg.get("role") != role:
            raise ProtocolError(f"{address} is a vnet {msg.get('role')}, not a {role}")
        ns, offer = msg.get("nonce"), msg.get("macs")
        if not isinstance(ns, bytes) or len(ns) != NONCE_BYTES:
            raise ProtocolError(f"malformed challenge from {address}")
        if not isinstance(offer, list) or not all(isinstance(m, str) for m in offer):
            raise ProtocolError(f"malformed challenge from {address}: no list of session MACs")
        ours = session_macs()
        choice = next((m for m in offer if m in ours), None)
        if choice is None:
            from vnet.binding.crypto import HINT

            raise ProtocolError(f"{address} offers session MACs {', '.join(offer) or 'none'}; this end computes "
                                f"{', '.join(ours)}", hint=HINT if _Gmac.name in offer else None)
        agreed = _negotiation(offer, choice)
        nc = secrets.token_bytes(NONCE_BYTES)
        ch.send({"type": "auth", "v": PROTOCOL_VERSION, "nonce": nc, "session_mac": choice,
                 "mac": _mac(key, b"vnet-client", ns, nc, agreed)})
        reply = ch.recv(("welcome", "error"), limit=HANDSHAKE_BYTES)
        if reply["type"] == "error" and reply.get("auth") is True:
            raise AuthError(f"the {role} at {address} refused our key (authentication failed)", hint=KEY_HINT)
        if reply["type"] == "error":
            raise ProtocolError(f"{address}: {reply.get('message')}")
        if not hmac.compare_digest(reply.get("mac") or b"", _mac(key, b"vnet-server", nc, ns, agreed)):
            raise AuthError(f"the {role} at {address} could not prove it has the key", hint=KEY_HINT)
        ch._start_session(key, ns, nc, server=False, session_mac=choice)
        return ch
    except (ConnectionError, OSError):
        ch.close()
        raise AuthError(f"the {role} at {address} closed the connection during authentication (wrong key?)",
                        hint=KEY_HINT) from None
    except BaseException:
        ch.close()
        raise
