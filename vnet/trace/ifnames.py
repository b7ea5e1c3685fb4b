"""Name the interface an event came through: (netns cookie, ifindex) -> name,
over the namespace vnet runs in and every `ip netns` namespace."""

from __future__ import annotations

import os
import socket
import time

from vnet import netns
from vnet.errors import RESOURCE_ERRNOS, ResourceError, VnetError, resource_error

REFRESH_EVERY_S = 1.0


class InterfaceNames:
    def __init__(self):
        self._table: dict[tuple[int, int], tuple[str, str | None]] = {}
        self._refreshed = 0.0

    def refresh(self) -> None:
        table = {}
        spaces: list[str | None] = [None]
        try:
            spaces += sorted(os.listdir(netns.NETNS_RUN_DIR))
        except FileNotFoundError:
            pass
        except OSError as e:  # out of descriptors: say so (exit 14), not an internal error
            if e.errno in RESOURCE_ERRNOS:
                raise resource_error(e, f"list the network namespaces ({netns.NETNS_RUN_DIR})") from None
            raise
        for ns in spaces:
            try:
                with netns.enter(ns):
                    cookie = netns.cookie()
                    for index, name in socket.if_nameindex():
                        table[(cookie, index)] = (name, ns)
                        if ns is None:  # cookie 0: a kernel that cannot tell; assume our namespace
                            table[(0, index)] = (name, ns)
            except (OSError, VnetError) as e:  # a namespace vanished while we looked: skip it
                if isinstance(e, ResourceError):  # but out of descriptors is no vanished namespace
                    raise
                if isinstance(e, OSError) and e.errno in RESOURCE_ERRNOS:
                    raise resource_error(e, f"read the interfaces of network namespace {ns or '(ours)'}") from None
                continue
        self._table = table
        self._refreshed = time.monotonic()

    def snapshot(self) -> dict[tuple[int, int], tuple[str, str | None]]:
        """The table as of the last refresh (e.g. for a trace file's header)."""
        return dict(self._table)

    def lookup(self, cookie: int, ifindex: int) -> tuple[str | None, str | None]:
        """(name, netns) or (None, None); refreshes at most once a second on a miss."""
        key = (cookie, ifindex)
        if key not in self._table and time.monotonic() - self._refreshed > REFRESH_EVERY_S:
            self.refresh()
        return self._table.get(key, (None, None))
