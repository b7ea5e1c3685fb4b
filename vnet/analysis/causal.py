"""A packet's hops in the order it took them, where the hosts' clocks cannot tell.

Hop times of different hosts are on the collector's clock within a bound
(clocksync); two hops on two hosts closer than the pair's bound may be in either
order by the clock. A QEMU guest's clock can be off by more than the hypervisor
takes to hand it a packet, so the plain time order would put the guest's receive
before the host's tap sent the frame. There the packet's own story decides:

1. A hop certainly precedes another on a different host when it is earlier by more
   than the pair's bound; on one host, when it is earlier (one clock: exact).
2. A packet's hops on a host form one stay, split between two of them where the
   packet was certainly on another host in between: one of that host's hops certainly
   after the first and one, the same or a later one there, certainly before the
   second (a packet that came back). A return whose both ends the bound blurs is not
   told from a crossing that way: then the precedences contradict, see below.
3. The stays are put in an order that keeps every certain precedence; where those
   leave a choice between stays of two hosts, the one that leaves at an outgoing
   hook towards the other's arriving (incoming) first hook goes first
   (clocksync.hop_role: a device's egress or a transmit, then an ingress or a receive);
   else the one whose first hop is earlier.
4. A hop that can fire after the packet left its host (clocksync.AFTERWARDS: a
   transmit completion's free) is no part of a stay: it is placed by its time.

Where the certain precedences contradict each other (a bound that did not hold),
the time order stands. Rows with the same time order and the same certain
precedences get the same answer: one solve per such pattern, not per packet; and a
row whose time order is forced hop by hop (every neighbour certain) is not solved.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def orders(t: np.ndarray, hosts: np.ndarray, roles: np.ndarray, after: np.ndarray,
           bound: Callable[[int, int], int | None]) -> np.ndarray:
    """Each row's hops in causal order: rows × hops of column indexes into t.
    t: rows × hops, collector times; hosts, roles, after: per column; bound(a, b): the
    clock error bound between hosts a and b (None: unknown, the clock never decides)."""
    rows, n = t.shape
    sigma = np.argsort(t, axis=1, kind="stable")
    hosts = np.asarray(hosts)
    if n < 2 or rows == 0 or np.unique(hosts).size < 2:
        return sigma
    ids = np.unique(hosts).tolist()
    big = np.iinfo(np.int64).max
    limit = np.full((max(ids) + 1,) * 2, -1, np.int64)   # same host: any gap is certain
    for a in ids:
        for b in ids:
            if a != b:
                v = bound(a, b)
                limit[a, b] = big if v is None else v
    # a row whose neighbours in time order are each certain (same host, or apart by more
    # than their bound) keeps it: the common case, found without a solve
    hs = hosts[sigma]
    gaps = np.diff(np.take_along_axis(t, sigma, axis=1), axis=1)
    forced = gaps > limit[hs[:, :-1], hs[:, 1:]]
    open_ = np.flatnonzero(~forced.all(axis=1))
    if not open_.size:
        return sigma
    to = t[open_]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if hosts[i] != hosts[j]]
    cert = np.zeros((open_.size, len(pairs)), np.int8)    # +1: i certainly first, -1: j certainly first
    for k, (i, j) in enumerate(pairs):
        b = limit[hosts[i], hosts[j]]
        d = to[:, j] - to[:, i]
        cert[:, k] = d > b
        cert[:, k] -= d < -b
    key = np.concatenate([sigma[open_].astype(np.int16), cert.astype(np.int16)], axis=1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    solved = np.array([_solve(u[:n], u[n:], pairs, hosts, roles, after) for u in uniq], np.int64)
    out = sigma.copy()
    out[open_] = solved[inv.ravel()]
    return out


def _solve(sig: np.ndarray, cert: np.ndarray, pairs: list[tuple[int, int]], hosts: np.ndarray,
           roles: np.ndarray, after: np.ndarray) -> np.ndarray:
    """One pattern's order (the module's rules 1-4); sig is its time order."""
    sig = [int(x) for x in sig]
    pos = {h: r for r, h in enumerate(sig)}
    first = {(i, j) if c > 0 else (j, i) for (i, j), c in zip(pairs, cert.tolist()) if c}
    core = [h for h in sig if not after[h]]
    stays: list[list[int]] = []
    by_host: dict[int, list[int]] = {}
    for h in core:
        by_host.setdefault(int(hosts[h]), []).append(h)

    def away(x: int, y: int, host: int) -> bool:
        """Certainly on another host between x and y (rule 2)."""
        for other, bs in by_host.items():
            if other == host:
                continue
            after_x = [i for i, g in enumerate(bs) if (x, g) in first]
            before_y = [i for i, g in enumerate(bs) if (g, y) in first]
            if after_x and before_y and after_x[0] <= before_y[-1]:
                return True
        return False

    for host, hs in by_host.items():
        cur = [hs[0]]
        for x, y in zip(hs, hs[1:]):
            if away(x, y, host):
                stays.append(cur)
                cur = []
            cur.append(y)
        stays.append(cur)
    m = len(stays)
    host_of = [int(hosts[s[0]]) for s in stays]
    pred: list[set[int]] = [set() for _ in range(m)]
    for x in range(m):
        for y in range(m):
            if x == y:
                continue
            if host_of[x] == host_of[y]:
                if pos[stays[x][0]] < pos[stays[y][0]]:
                    pred[y].add(x)
            elif any((u, v) in first for u in stays[x] for v in stays[y]):
                pred[y].add(x)

    def leads(y: int, x: int) -> bool:
        """The hooks say stay y hands the packet to stay x, not the other way."""
        if host_of[x] == host_of[y]:
            return False
        return int(roles[stays[y][-1]]) - int(roles[stays[x][0]]) > int(roles[stays[x][-1]]) - int(roles[stays[y][0]])

    placed: set[int] = set()
    seq: list[int] = []
    while len(placed) < m:
        ready = [x for x in range(m) if x not in placed and pred[x] <= placed]
        if not ready:
            return np.array(sig)     # the certain precedences contradict each other
        free = [x for x in ready if not any(leads(y, x) for y in ready if y != x)] or ready
        x = min(free, key=lambda s: pos[stays[s][0]])
        placed.add(x)
        seq.extend(stays[x])
    for h in sig:                    # rule 4: after the last hop earlier in time, in its host's order
        if after[h]:
            at = max((i + 1 for i, g in enumerate(seq) if pos[g] < pos[h]), default=0)
            mine = [i for i, g in enumerate(seq) if hosts[g] == hosts[h]]
            at = min([at] + [i for i in mine if pos[seq[i]] > pos[h]])
            seq.insert(at, h)
    return np.array(seq)
