"""The building blocks of the path join (vnet.analysis.stream) and its percentiles.

A window of events is sorted by (pkt_id, time) (order_by_packet) and cut into
packet instances (group_sorted).

A packet instance is a pkt_id's events in time order; when a hop repeats inside
one pkt_id (identical packets sent again, see docs/identity.md), the k-th sighting
at each hop belongs to the k-th instance. A path is an instance's sequence of
hops; a segment a pair of consecutive hops on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999))
TAIL_Q = 0.99
_MULT = np.uint64(0x9E3779B97F4A7C15)


def stats(values: np.ndarray, scratch: bool = False) -> dict:
    """count, min, nearest-rank percentiles and max of integer nanoseconds (O(n): partition;
    in place when the caller says `values` is a scratch copy)."""
    n = int(values.size)
    if not n:
        return {"count": 0}
    ranks = [max(0, int(np.ceil(q * n)) - 1) for _, q in QUANTILES]
    kth = sorted({0, n - 1, *ranks})
    if scratch:
        values.partition(kth)
        part = values
    else:
        part = np.partition(values, kth)
    out = {"count": n, "min_ns": int(part[0])}
    out.update({f"{name}_ns": int(part[k]) for (name, _), k in zip(QUANTILES, ranks)})
    out["max_ns"] = int(part[n - 1])
    return out


@dataclass
class Instances:
    """Events grouped per packet instance, each in time order."""

    ts: np.ndarray
    hop: np.ndarray
    pkt_id: np.ndarray      # per event
    start: np.ndarray       # first event of each instance; start[-1] == len(ts)

    @property
    def count(self) -> int:
        return self.start.size - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.start)

    def first_ts(self) -> np.ndarray:
        return self.ts[self.start[:-1]]

    def e2e(self) -> np.ndarray:
        return self.ts[self.start[1:] - 1] - self.ts[self.start[:-1]]

    def select(self, keep: np.ndarray) -> "Instances":
        ev = np.repeat(keep, self.sizes)
        sizes = self.sizes[keep]
        return Instances(self.ts[ev], self.hop[ev], self.pkt_id[ev], np.r_[0, np.cumsum(sizes)])


def order_by_packet(pkt_id: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.lexsort((ts, pkt_id)), cheaper: one (SIMD) sort of u64 keys that pack the high
    bits of pkt_id over the event index, which orders events by pkt_id prefix and then
    by input order; only the runs of events where that is not (pkt_id, ts) order (two
    ids sharing a prefix, or a packet's events out of time order across hosts) are
    sorted again, stably, so the result is exactly the lexsort's.
    Returns (order, pkt_id[order], ts[order])."""
    n = pkt_id.size
    if n < 2:
        return np.arange(n), pkt_id.copy(), ts.copy()
    b = np.uint64(max(int(n - 1).bit_length(), 1))
    key = pkt_id >> b
    key <<= b
    key |= np.arange(n, dtype=np.uint64)
    key.sort()
    key &= np.uint64((1 << int(b)) - 1)
    order = key.view(np.int64)
    p, t = pkt_id[order], ts[order]
    down = p[1:] < p[:-1]                          # two ids under one prefix, out of order
    late = p[1:] == p[:-1]
    late &= t[1:] < t[:-1]                         # one packet's events out of time order
    if down.any():
        bad = down | late
        if int(np.count_nonzero(bad)) > n // 4:  # largely out of order: the plain sort is cheaper
            order = np.lexsort((ts, pkt_id))
            return order, pkt_id[order], ts[order]
        # the prefix runs holding a misordered pair, re-sorted by (pkt_id, ts)
        pre = p >> b
        cut = np.r_[0, np.flatnonzero(pre[1:] != pre[:-1]) + 1, n]
        run = np.unique(np.searchsorted(cut, np.flatnonzero(bad), "right") - 1)
        ev = np.flatnonzero(np.repeat(np.isin(np.arange(cut.size - 1), run), np.diff(cut)))
        sub = np.lexsort((t[ev], p[ev], np.repeat(run, (cut[run + 1] - cut[run]))))
    elif late.any():
        # Each id's events are contiguous: only the ids with a misordered pair are sorted
        # again, by (id, time), stably; the data is nearly sorted, which timsort likes.
        new = np.empty(n, bool)
        new[0] = True
        np.not_equal(p[1:], p[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        g = np.searchsorted(starts, np.flatnonzero(late), "right") - 1  # groups to sort (ascending)
        g = g[np.r_[True, g[1:] != g[:-1]]]
        lo_, hi_ = starts[g], np.r_[starts, n][g + 1]
        size = hi_ - lo_
        ev = np.repeat(lo_ - np.cumsum(size) + size, size) + np.arange(int(size.sum()))
        gid = np.repeat(np.arange(g.size, dtype=np.uint64), size)
        te = t[ev]
        lo, span = int(te.min()), int(te.max()) - int(te.min())
        if span < 1 << 40 and g.size < 1 << 23:
            key = gid << np.uint64(40)
            key |= (te - lo).astype(np.uint64)
            sub = np.argsort(key, kind="stable")
        else:
            sub = np.lexsort((te, gid))
    else:
        return order, p, t
    order[ev] = order[ev][sub]
    p[ev], t[ev] = p[ev][sub], t[ev][sub]
    return order, p, t


def group_sorted(pid: np.ndarray, ts: np.ndarray, hop: np.ndarray) -> Instances:
    """Events in (pkt_id, time) order, cut into packet instances."""
    n = ts.size
    if not n:
        return Instances(ts, hop, pid, np.zeros(1, np.int64))
    new = np.empty(n, bool)
    new[0] = True
    np.not_equal(pid[1:], pid[:-1], out=new[1:])
    starts = np.flatnonzero(new)
    # A hop seen twice under one pkt_id: a bit per hop (mod 64) per group finds those groups cheaply.
    sizes = np.diff(np.r_[starts, n])
    seen = np.empty(starts.size, np.uint64)
    step = 1 << 18
    for g in range(0, starts.size, step):
        lo, hi = int(starts[g]), int(starts[g + step]) if g + step < starts.size else n
        h = hop[lo:hi].astype(np.uint64)
        h += (h >> np.uint64(16)) * np.uint64(37)  # hops numbered host << 16 | hop: spread the hosts
        h &= np.uint64(63)
        bits = np.left_shift(np.uint64(1), h)
        seen[g:g + step] = np.bitwise_or.reduceat(bits, starts[g:g + step] - lo)
    rep = _popcount(seen) < sizes
    if rep.any():
        ts, pid, hop, new = _split_repeats(ts, pid, hop, new, starts, sizes, rep)
    return Instances(ts, hop, pid, np.r_[np.flatnonzero(new), n])


def _split_repeats(ts, pid, hop, new, starts, sizes, rep):
    """In the groups with a repeated hop, the k-th sighting at each hop makes instance k."""
    ev = np.flatnonzero(np.repeat(rep, sizes))
    g = np.repeat(np.arange(starts.size), sizes)[ev]
    o = np.lexsort((ts[ev], hop[ev], g))
    key_g, key_h = g[o], hop[ev][o]
    run = np.r_[True, (key_g[1:] != key_g[:-1]) | (key_h[1:] != key_h[:-1])]
    idx = np.arange(o.size)
    rank_sorted = idx - np.maximum.accumulate(np.where(run, idx, 0))
    rank = np.empty_like(rank_sorted)
    rank[o] = rank_sorted
    o2 = np.lexsort((ts[ev], rank, g))
    ts, pid, hop = ts.copy(), pid.copy(), hop.copy()
    ts[ev], pid[ev], hop[ev] = ts[ev][o2], pid[ev][o2], hop[ev][o2]
    r2, g2 = rank[o2], g[o2]
    new = new.copy()
    new[ev] = np.r_[True, (g2[1:] != g2[:-1]) | (r2[1:] != r2[:-1])]
    return ts, pid, hop, new


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(np.int64)
