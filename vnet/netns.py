"""Enter a network namespace for the calling thread, and back.

vnet attaches in the namespace that owns an interface: ifindexes and netlink
sockets are per namespace. Only the calling thread moves; sockets and netlink
handles created inside keep that namespace for life.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import socket
import struct
from collections.abc import Iterator

from vnet.errors import RESOURCE_ERRNOS, NoSuchInterfaceError, resource_error

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = getattr(socket, "SO_NETNS_COOKIE", 71)  # Linux >= 5.14; Python < 3.13 lacks the name
NETNS_RUN_DIR = "/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def path(ns: str) -> str:
    """A name under /run/netns (`ip netns`), or a path such as /proc/PID/ns/net."""
    return ns if "/" in ns else os.path.join(NETNS_RUN_DIR, ns)


def _setns(fd: int) -> None:
    # Python 3.11 has no os.setns; never use a helper that creates namespaces on a typo.
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@functools.cache
def _nsfs_dev() -> int:
    """The device of every namespace file (nsfs: one for the whole system)."""
    return os.stat("/proc/thread-self/ns/net").st_dev


@contextlib.contextmanager
def open_fd(ns: str) -> Iterator[int]:
    try:
        fd = os.open(path(ns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoSuchInterfaceError(f"no such network namespace: {ns}", hint="list them with 'ip netns list'") from None
    except OSError as e:
        if e.errno in RESOURCE_ERRNOS:
            raise resource_error(e, f"open network namespace {ns}") from None
        raise
    try:
        # `ip netns del` unmounts the namespace, then unlinks the name: in between, and for a name
        # left by a crash, the path is a plain file that setns refuses with EINVAL.
        if os.fstat(fd).st_dev != _nsfs_dev():
            raise NoSuchInterfaceError(f"no such network namespace: {ns} (its name is left, the namespace is not)",
                                       hint="list them with 'ip netns list'")
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def enter_fd(fd: int) -> Iterator[None]:
    # thread-self, not self: /proc/self/ns/net is the *main* thread's namespace.
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in RESOURCE_ERRNOS:
            raise resource_error(e, "open this thread's network namespace") from None
        raise
    try:
        _setns(fd)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


@contextlib.contextmanager
def enter(ns: str | None) -> Iterator[None]:
    """Run the body in netns `ns` (None: stay where the thread is)."""
    if ns is None:
        yield
        return
    with open_fd(ns) as fd, enter_fd(fd):
        yield


def cookie(ns: str | None = None) -> int:
    """The netns cookie, as bpf_get_netns_cookie() reports it (0 if the kernel can't say)."""
    try:
        with enter(ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return struct.unpack("=Q", s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]
    except OSError:
        return 0


def current_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino
