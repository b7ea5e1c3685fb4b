"""Name the interface an event came through: (netns cookie, ifindex) -> name,
over the namespace vnet runs in and every `ip netns` namespace."""

from __future__ import annotations

import os
import socket
import time

from vnet import netns
from vnet.errors import VnetError

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
        for ns in spaces:
            try:
                with netns.enter(ns):
                    cookie = netns.cookie()
                    for index, name in socket.if_nameindex():
                        table[(cookie, index)] = (name, ns)
                        if ns is None:  # cookie 0: a kernel that cannot tell; assume our namespace
                            table[(0, index)] = (name, ns)
            except (OSError, VnetError):  # a namespace vanished while we looked: skip it
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
