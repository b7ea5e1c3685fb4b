"""Enter a named network namespace (ip netns) for the calling thread, and back.

vnet attaches in the namespace that owns an interface: ifindexes and netlink
sockets are per namespace. Python 3.11 has no os.setns, hence ctypes.
"""

from __future__ import annotations

import ctypes
import os
import socket
from contextlib import contextmanager

from vnet.errors import NoSuchInterfaceError

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71  # Linux >= 5.14
NETNS_RUN_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({what}): {os.strerror(err)}")


@contextmanager
def enter(name: str | None):
    """Run the body inside netns `name` (None: stay where we are)."""
    if name is None:
        yield
        return
    try:
        target = os.open(path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoSuchInterfaceError(f"no such network namespace: {name}",
                                   hint="list them with 'ip netns list'") from None
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target, name)
        try:
            yield
        finally:
            _setns(home, "original namespace")
    finally:
        os.close(target)
        os.close(home)


def current_cookie() -> int:
    """The kernel's netns cookie of the calling thread's namespace (0 if unknown)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return 0


def current_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino
