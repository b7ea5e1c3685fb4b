#!/usr/bin/env python3
"""Attach tools/bench/floor.bpf.o (empty programs) where `vnet trace` attaches at every hop:
tcx ingress+egress of each NS/DEV given, and the two tracepoints. Prints "ready" on stderr,
holds the links until SIGINT/SIGTERM; the links die with the process. For datapath.py only.

Usage: floor_attach.py OBJECT NS/DEV [NS/DEV ...]
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vnet import netns  # noqa: E402
from vnet.binding.object import BpfObject  # noqa: E402


def main() -> int:
    obj = BpfObject(sys.argv[1])
    obj.load()
    links = [obj.programs[name].attach_trace() for name in ("floor_net_dev_queue", "floor_netif_receive_skb")]
    tc = obj.programs["floor_tc"]
    for where in sys.argv[2:]:
        ns, dev = where.split("/")
        with netns.enter(ns):
            ifindex = socket.if_nametoindex(dev)  # in this netns (sysfs shows the mount's)
            links += [tc.attach_tcx(ifindex, ingress) for ingress in (True, False)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"floor: ready, {len(links)} programs attached", file=sys.stderr, flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
