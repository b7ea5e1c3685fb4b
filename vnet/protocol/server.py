"""A listening socket that authenticates every peer before a handler sees it.

One thread per connection (bounded); a peer that fails the handshake or
breaks the protocol is logged with the reason and dropped, and the server
keeps serving the others. TCP listens on loopback unless told otherwise."""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from typing import Callable

from vnet.errors import UsageError

from .channel import MAX_CONTROL_BYTES, Channel, ProtocolError, accept, is_loopback, parse_address

log = logging.getLogger("vnet.protocol.server")
HANDSHAKE_TIMEOUT = 10.0
PEERS_STOP_S = 10.0      # stopping: how long the peers' handlers get to finish (after their sockets are shut)


class Server:
    def __init__(self, address: str, key: bytes, role: str, handler: Callable[[Channel], None], *,
                 allow_remote: bool = False, max_peers: int = 32, limit: int = MAX_CONTROL_BYTES):
        family, sockaddr = parse_address(address, listen=True)
        if family != socket.AF_UNIX and not allow_remote and not is_loopback(sockaddr):
            raise UsageError(f"refusing to listen on {address}: not a loopback address",
                             hint="pass --allow-remote to listen beyond this host (peers still need the key)")
        self.address = address
        self.key = key
        self.role = role
        self.handler = handler
        self.limit = limit
        self._slots = threading.BoundedSemaphore(max_peers)
        self._stop = threading.Event()
        self._peers: dict[threading.Thread, socket.socket] = {}
        self._peers_lock = threading.Lock()
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX:
            if os.path.exists(sockaddr):
                self._unlink_stale(sockaddr, address)
            old = os.umask(0o077)
            try:
                self.sock.bind(sockaddr)
            except OSError as e:
                self.sock.close()
                raise UsageError(f"cannot listen on {address}: {e.strerror}") from None
            finally:
                os.umask(old)
            self.path = sockaddr
        else:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.sock.bind(sockaddr)
            except OSError as e:
                self.sock.close()
                raise UsageError(f"cannot listen on {address}: {e.strerror}",
                                 hint="another process has that port: give another --listen"
                                 if e.errno == errno.EADDRINUSE else None) from None
            self.path = None
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        if family != socket.AF_UNIX:
            host, port = self.sock.getsockname()[:2]
            self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _unlink_stale(self, path: str, address: str) -> None:
        """A socket file left by a killed server is removed; one a live server answers on
        is not taken over (it would silently lose its peers)."""
        import stat

        if not stat.S_ISSOCK(os.stat(path).st_mode):
            self.sock.close()
            raise UsageError(f"cannot listen on {address}: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: stale
            return
        finally:
            probe.close()
        self.sock.close()
        raise UsageError(f"cannot listen on {address}: a server is already listening there",
                         hint="stop it first, or give another --listen")

    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> None:
        """Until stop(): accept, authenticate, hand over (each peer in its own thread). Then
        the peers' connections are shut and their handlers finish (bounded): a collector
        closes its files only once nothing writes to them any more."""
        try:
            while not self._stop.is_set():
                try:
                    conn, addr = self.sock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                peer = addr if isinstance(addr, str) and addr else (
                    f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else "unix peer")
                if not self._slots.acquire(blocking=False):
                    log.warning("refusing %s: too many connections", peer)
                    conn.close()
                    continue
                thread = threading.Thread(target=self._serve_peer, args=(conn, peer), name=f"peer {peer}",
                                          daemon=True)
                with self._peers_lock:
                    self._peers[thread] = conn
                thread.start()
        finally:
            self.sock.close()
            if self.path and os.path.exists(self.path):
                os.unlink(self.path)
            self._stop_peers()

    def _stop_peers(self) -> None:
        with self._peers_lock:
            peers = dict(self._peers)
        for conn in peers.values():
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler waiting in recv
            except OSError:
                pass
        deadline = time.monotonic() + PEERS_STOP_S
        for thread in peers:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _serve_peer(self, conn: socket.socket, peer: str) -> None:
        ch = None
        try:
            ch = accept(conn, peer, self.key, self.role, timeout=HANDSHAKE_TIMEOUT)
            ch.limit = self.limit
            conn.settimeout(None)
            log.info("%s authenticated (session MAC %s)", peer, ch.session_mac)
            self.handler(ch)
        except ProtocolError as e:
            log.warning("dropped %s: %s", peer, e)
        except (ConnectionError, TimeoutError, OSError) as e:
            log.info("%s went away: %s", peer, e)
        except Exception:  # noqa: BLE001 - one peer's bug must not stop the server
            log.exception("handler failed for %s", peer)
        finally:
            if ch is not None:
                ch.close()
            else:
                conn.close()
            with self._peers_lock:
                self._peers.pop(threading.current_thread(), None)
            self._slots.release()
