"""Each host's clock on the collector's: an offset that may drift, and a bound on its error.

Two sources, the second refining the first:

1. The collector's pings (`clock` chunks): each says the agent's clock minus the
   collector's lay within ±error (half the exchange's round trip) at one moment.
   The best ping of each window is kept and a line is fitted through them
   (weights 1/error²): offset and drift. Its bound, taken where the pings are, is the
   largest |line − ping| + ping error: the true offset lay inside every kept ping's
   interval, so the line is that far from it at most.

2. The packets themselves (after a first join on the ping clocks): a packet that
   leaves host A and then shows up on host B cannot arrive before it left, and one
   going the other way neither. With B's clock wrong by ε (on the collector's time
   scale), A→B packets show a gap first-on-B − last-on-A = delay + ε, B→A packets
   first-on-A − last-on-B = delay − ε. So ε lies below the smallest A→B gap (U)
   and above minus the smallest B→A gap (L): a hard interval wherever traffic flows
   both ways. vnet takes its middle, which assumes the fastest packet each way took
   as long (as NTP does), and states half its width as the bound; per window of the
   run, with a line through the windows for drift. Which way a packet went is read
   from its hooks (it leaves a host at an outgoing hook, a device's egress or a
   transmit, and reaches the other at an incoming one). Where they do not say: the
   differences of the midpoints of its events on B and on A fall in two groups with
   the clock error between them, so the widest gap between them splits the two ways
   if the split leaves room for the clock in every window (a wrong split of one-way
   traffic never does); else the traffic is one way, the way the midpoints lean,
   which is right while the ping bound is below the crossing plus the packet's time
   on the two hosts.

The 1% of each window's smallest gaps are left out as outliers (a stray pkt_id match).
Beyond 250,000 crossing packets an even sample is taken (the cost stays ~0.1 s).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from vnet.collector.tracefile import MAX_CLOCK_NS

PING_WINDOW_NS = 10_000_000_000    # one ping kept per window (the collector pings every 5 s)
PING_SLACK = 4                     # pings with errors beyond this many times the best are left out
MIN_WINDOW_PACKETS = 20            # packets each way that a window of crossings needs
MAX_WINDOWS = 20
MAX_CROSSINGS = 250_000            # packets per table looked at (evenly taken beyond)


@dataclass
class ClockMap:
    """A host's clock minus the collector's, as a line in the host's time:
    offset(t) = offset_ns + drift * (t - t0); error_ns bounds it (None: unknown)."""

    offset_ns: int = 0
    drift: float = 0.0            # d offset / d t: 1e-6 is 1 ppm
    t0: int = 0                   # host-clock time the line is anchored at
    error_ns: int | None = None
    source: str = "none"          # "none", "ping", "packets", "causality"
    pings: int = 0                # pings the line rests on
    crossings: tuple[int, int] = (0, 0)   # packets each way that refined it (to, from the reference)
    windows: int = 0              # windows of crossings used
    ref: int | None = None        # refined against this host's clock: error_ns − its error is the pair's bound
    notes: list[str] = field(default_factory=list)

    def at(self, t: int) -> int:
        return self.offset_ns + int(round(self.drift * (t - self.t0))) if self.drift else self.offset_ns

    def offsets(self, ts: np.ndarray) -> np.ndarray:
        """The offset at each host time (float64)."""
        out = (ts - self.t0).astype(np.float64)
        out *= self.drift
        out += self.offset_ns
        return out

    def host_times(self, ts: np.ndarray) -> np.ndarray:
        """The host times whose collector times are ts: h = t + offset(h), solved. Not
        t + offset(t): a guest's clock can be a day behind the collector's, and its drift
        over that day (a ping line's 100 ppm: 9 s) would put h at the wrong moment."""
        h = ts + self.offset_ns
        for _ in range(3):   # each step shrinks the error by the drift (ppm): exact to the ns
            h = ts + np.rint(self.offsets(h)).astype(np.int64)
        return h

    def host_time(self, t: int) -> int:
        return int(self.host_times(np.array([t], np.int64))[0])

    def to_collector(self, ts: np.ndarray) -> np.ndarray:
        """Host times (int64) -> collector times, in place."""
        if self.drift:
            corr = (ts - self.t0).astype(np.float64)
            corr *= self.drift
            ts -= np.rint(corr).astype(np.int64)
        if self.offset_ns:
            ts -= self.offset_ns
        return ts

    def shifted(self, eps_ns: float, eps_drift: float, t_ref: int, extra_error: int | None,
                source: str) -> "ClockMap":
        """This map with a correction eps(t) = eps_ns + eps_drift * (t - t_ref) added
        (t on the collector's scale, close enough to ours: drift is ppm)."""
        t0 = self.host_time(t_ref)    # anchored at t_ref, in our time
        err = None if self.error_ns is None or extra_error is None else extra_error
        return replace(self, offset_ns=self.at(t0) + int(round(eps_ns)), drift=self.drift + eps_drift, t0=t0,
                       error_ns=err, source=source, notes=list(self.notes))

    def describe(self) -> dict:
        return {"offset_ns": self.offset_ns, "error_ns": self.error_ns, "drift_ppm": round(self.drift * 1e6, 3),
                "t0_ns": self.t0, "source": self.source, "pings": self.pings,
                "crossings": list(self.crossings), "windows": self.windows, "reference": self.ref,
                "notes": self.notes}


def _line(t: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float, float]:
    """Weighted least-squares line through (t, y): (value at the weighted mean time, slope, that time)."""
    tm = float(np.average(t, weights=w))
    ym = float(np.average(y, weights=w))
    dt = t - tm
    den = float(np.sum(w * dt * dt))
    slope = float(np.sum(w * dt * (y - ym)) / den) if den > 0 else 0.0
    return ym, slope, tm


def from_pings(samples: list[dict]) -> ClockMap:
    """The line through a host's clock chunks (see the module's docstring, 1)."""
    rows = []
    for c in samples:
        off, err = c.get("offset_ns"), c.get("error_ns")
        if not isinstance(off, int) or not isinstance(err, int) or err < 0:
            continue
        t = c.get("agent_mono_ns")
        if not isinstance(t, int):
            at = c.get("at_ns")
            t = at + off if isinstance(at, int) else 0
        if max(abs(t), abs(off), err) >= MAX_CLOCK_NS:  # a damaged sample: int64 arithmetic would overflow
            continue
        rows.append((t, off, err))
    if not rows:
        return ClockMap()
    a = np.array(rows, np.int64)
    a = a[np.argsort(a[:, 0], kind="stable")]
    best = int(a[:, 2].min())
    a = a[a[:, 2] <= max(PING_SLACK * best, best + 20_000)]
    win = (a[:, 0] - a[0, 0]) // PING_WINDOW_NS
    keep = [int(np.flatnonzero(win == k)[np.argmin(a[win == k, 2])]) for k in np.unique(win)]
    k = a[keep]
    if len(k) < 2:
        i = int(np.argmin(a[:, 2]))
        return ClockMap(int(a[i, 1]), 0.0, int(a[i, 0]), int(a[i, 2]), "ping", 1)
    t, y, e = k[:, 0].astype(np.float64), k[:, 1].astype(np.float64), k[:, 2].astype(np.float64)
    ym, slope, tm = _line(t, y, 1.0 / (e + 1000.0) ** 2)
    fit = ym + slope * (t - tm)
    bound = int(np.ceil(np.max(np.abs(fit - y) + e)))
    return ClockMap(int(round(ym)), slope, int(round(tm)), bound, "ping", len(k))


# -- packets crossing between hosts ---------------------------------------------------------------------


# Where a probe sees a packet: leaving its host's stack towards a device or a guest (+1),
# or coming in (-1). A packet's last event on the host it leaves is normally an
# outgoing one and its first on the host it reaches an incoming one: that says which
# way it crossed even when the clocks' bound is wider than the crossing.
OUTGOING = {"net:net_dev_queue", "net:net_dev_start_xmit", "net:net_dev_xmit", "sock:udp_sendmsg",
            "sock:tcp_sendmsg", "ip:output", "ip:output6", "ovs:vport_send", "bridge:forward", "veth:xmit",
            "tun:net_xmit", "vhost:handle_rx", "xen:start_xmit", "xen:rx_action", "virtio:start_xmit"}
INCOMING = {"net:netif_rx", "net:napi_gro_receive_entry", "net:netif_receive_skb", "sock:udp_recvmsg",
            "sock:tcp_recvmsg", "sock:datagram_copy", "sock:udp_enqueue", "sock:udp_read", "sock:tcp_receive",
            "ovs:vport_receive", "bridge:handle_frame", "tun:get_user", "vhost:handle_tx", "xen:tx_action"}


# Probes that can fire on a host after the packet has left it (a driver frees a sent
# packet at transmit completion: virtio-net, so skb:consume_skb; a clone dropped later):
# never taken as the end of a packet's stay on a host, or a crossing would look faster
# than it was, or backwards.
AFTERWARDS = {"sock:consume_skb", "drop:kfree_skb"}


def _probe(name: str) -> str:
    if name.startswith("["):
        name = name.partition("] ")[2]
    return name.split(" ", 1)[0]


def hop_role(name: str) -> int:
    """+1 outgoing, -1 incoming, 0 neither or unknown, from a hop's name as the join
    makes it ("[host] net:netif_receive_skb ns/eth0", "[host] eth0:egress")."""
    probe = _probe(name)
    if probe.endswith(":egress"):
        return 1
    if probe.endswith(":ingress"):
        return -1
    return 1 if probe in OUTGOING else -1 if probe in INCOMING else 0


def hop_traits(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per hop name: its role (hop_role) and whether it may fire after the packet left
    its host (AFTERWARDS)."""
    roles = np.array([hop_role(n) for n in names] or [0], np.int8)
    after = np.array([_probe(n) in AFTERWARDS for n in names] or [False])
    return roles, after


@dataclass
class Crossings:
    """Packets seen on both hosts a < b (collector times from the first join): when
    (first event on either), the midpoints' difference b − a, the two gaps, and which
    way the hooks at the ends say it went (+1 a→b, -1 b→a, 0 they do not say)."""

    t: np.ndarray
    mid: np.ndarray      # mid_b − mid_a
    gap_ab: np.ndarray   # first_b − last_a
    gap_ba: np.ndarray   # first_a − last_b
    hooks: np.ndarray    # int8


def crossings(table, most: int = MAX_CROSSINGS) -> dict[tuple[int, int], Crossings]:
    """The packets of a joined table (stream.PacketTable) seen on two hosts or more, per
    pair of hosts: every one, or every n-th where there are more than `most` (the
    bounds rest on the fastest crossings, which a large even sample keeps). A path's
    hops are in time order, so a host's first and last event are the first and last
    of its hops in the path."""
    parts: dict[tuple[int, int], list[tuple[np.ndarray, ...]]] = {}
    hop_host = table.hop_host
    roles, later = hop_traits(table.hop_names)
    multi = [p for p in table.paths if np.unique(hop_host[list(p.hops)]).size > 1]
    step = max(1, -(-sum(p.count for p in multi) // most))
    for p in multi:
        hosts = hop_host[list(p.hops)]
        uniq = np.unique(hosts).tolist()
        prole = roles[list(p.hops)]
        ends = {}
        for h in uniq:
            on = np.flatnonzero(hosts == h)
            kept = on[~later[[p.hops[i] for i in on]]]   # its stay ends before any AFTERWARDS hop
            ends[h] = (int(on[0]), int((kept if kept.size else on)[-1]))
        for first, _pkt, d in p.parts:
            if step > 1:
                first, d = first[::step], d[::step]
            at = np.empty((first.size, len(p.hops)), np.int64)   # each hop's time
            at[:, 0] = first
            if len(p.hops) > 1:
                np.cumsum(d, axis=1, dtype=np.int64, out=at[:, 1:])
                at[:, 1:] += first[:, None]
            for i, a in enumerate(uniq):
                for b in uniq[i + 1:]:
                    (ia, ja), (ib, jb) = ends[a], ends[b]
                    fa, la, fb, lb = at[:, ia], at[:, ja], at[:, ib], at[:, jb]
                    # a->b: leaves a outgoing, reaches b incoming; b->a the other way round
                    score = (int(prole[ja]) - int(prole[ib])) - (int(prole[jb]) - int(prole[ia]))
                    mid = (fb + lb) // 2 - (fa + la) // 2
                    parts.setdefault((a, b), []).append((np.minimum(fa, fb), mid, fb - la, fa - lb,
                                                         np.full(first.size, np.sign(score), np.int8)))
    return {k: Crossings(*(np.concatenate([x[j] for x in v]) for j in range(5))) for k, v in parts.items()}


def _kth_smallest(x: np.ndarray) -> float:
    k = x.size // 100
    return float(np.partition(x, k)[k])


def _windows(t: np.ndarray, k: int) -> np.ndarray:
    """Each time's window of k equal ones over the run."""
    t0 = int(t.min())
    span = int(t.max()) - t0 + 1
    w = (t - t0).astype(np.float64)
    w *= k / span
    return w.astype(np.int64)


def _slope(t: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y over t, on at most 50,000 evenly taken points."""
    if t.size > 50_000:
        step = t.size // 50_000 + 1
        t, y = t[::step], y[::step]
    t = t.astype(np.float64)
    t -= t.mean()
    den = float(np.dot(t, t))
    return float(np.dot(t, y.astype(np.float64) - y.mean()) / den) if den > 0 else 0.0


def _contradictions(c: Crossings, ab: np.ndarray, win: np.ndarray, k: int) -> int:
    """Windows where the packets said to go a->b and those said to go b->a leave no room
    for the clock (their lower bound above their upper one, the drift taken out)."""
    trend = _drift(c, ab) * (c.t - c.t.min()).astype(np.float64)
    up, lo = c.gap_ab - trend, -(c.gap_ba + trend)
    bad = 0
    for j in range(k):
        a, b = (win == j) & ab, (win == j) & ~ab
        if a.any() and b.any() and -_kth_smallest(-lo[b]) > _kth_smallest(up[a]):
            bad += 1
    return bad


def _directions(c: Crossings, k: int = 10) -> np.ndarray:
    """a->b (True) or b->a for each packet: the hooks' word where they give one; else the
    widest gap between the midpoint differences (less their trend over the run: the
    clock may drift) that leaves room for the clock in every window, a two-way split;
    else one way only, the way the midpoints lean (module docstring)."""
    labelled = c.hooks != 0
    ab = c.hooks > 0
    if labelled.all():
        return ab
    free = ~labelled
    t, mid = c.t[free].astype(np.float64), c.mid[free].astype(np.float64)
    if t.size > 2:
        mid -= _slope(t, mid) * (t - t.mean())
        mid -= np.median(mid)
    m = np.sort(mid)
    k = max(1, min(k, c.t.size // (4 * MIN_WINDOW_PACKETS)))
    win = _windows(c.t, k)
    if m.size > 1:
        gaps = np.diff(m)
        least = max(MIN_WINDOW_PACKETS, m.size // 20)  # a gap inside one way's tail is not the split
        top = np.argpartition(gaps, -10)[-10:] if gaps.size > 10 else np.arange(gaps.size)
        for g in top[np.argsort(gaps[top])[::-1]]:
            if gaps[g] <= 0:
                break
            if min(g + 1, m.size - g - 1) < least:
                continue
            cand = ab.copy()
            cand[free] = mid > (m[g] + m[g + 1]) / 2
            if _contradictions(c, cand, win, k) == 0:
                return cand
    lean = bool(np.median(c.mid[free]) > 0) if labelled.sum() * 2 < c.t.size else bool(ab[labelled].mean() >= 0.5)
    return np.where(labelled, ab, lean)


@dataclass
class PairFit:
    """B's clock error against A's (collector scale), eps(t) = eps_ns + drift * (t − t_ref)."""

    eps_ns: float
    drift: float
    t_ref: int
    bound: int | None     # None: one-way traffic only (causality, no bound of its own)
    n_ab: int
    n_ba: int
    windows: int
    skipped: int          # windows whose intervals were empty (L > U)
    source: str


def _drift(c: Crossings, ab: np.ndarray) -> float:
    """How fast B's clock error moves over the run, from both ways' gaps (each follows it,
    one from above, one from below), each less its median."""
    y = np.where(ab, c.gap_ab, -c.gap_ba).astype(np.float64)
    for side in (ab, ~ab):
        if side.any():
            y[side] -= np.median(y[side])
    return _slope(c.t, y) if c.t.size > 2 else 0.0


def fit_pair(c: Crossings) -> PairFit | None:
    """The correction of B against A from the packets between them (module docstring, 2)."""
    if not c.t.size:
        return None
    ab = _directions(c)
    n_ab, n_ba = int(ab.sum()), int((~ab).sum())
    t0 = int(c.t.min())
    if min(n_ab, n_ba) < MIN_WINDOW_PACKETS:
        # one way only: keep the ping clock, moved just enough that no packet arrives before it left
        upper = _kth_smallest(c.gap_ab[ab]) if n_ab else None
        lower = -_kth_smallest(c.gap_ba[~ab]) if n_ba else None
        eps = 0.0   # (1 ns to spare: a tie would leave the two hosts' hops in either order)
        if upper is not None and eps >= upper:
            eps = float(upper) - 1
        if lower is not None and eps <= lower:
            eps = float(lower) + 1
        return PairFit(eps, 0.0, t0, None, n_ab, n_ba, 0, 0, "causality")
    # the windows' intervals on gaps less the drift, so that a window's packets agree
    s0 = _drift(c, ab)
    trend = s0 * (c.t - t0).astype(np.float64)
    up_all, lo_all = c.gap_ab - trend, -(c.gap_ba + trend)
    k = int(min(MAX_WINDOWS, max(1, min(n_ab, n_ba) // (5 * MIN_WINDOW_PACKETS))))
    w = _windows(c.t, k)
    tk, mk, hk, skipped = [], [], [], 0
    for j in range(k):
        here = w == j
        a, b = here & ab, here & ~ab
        if a.sum() < MIN_WINDOW_PACKETS or b.sum() < MIN_WINDOW_PACKETS:
            continue
        upper, lower = _kth_smallest(up_all[a]), -_kth_smallest(-lo_all[b])
        if lower > upper:
            skipped += 1
            continue
        tk.append(float(np.median(c.t[here])))
        mk.append((upper + lower) / 2)
        hk.append((upper - lower) / 2)
    if not tk:
        return PairFit(0.0, 0.0, t0, None, n_ab, n_ba, 0, skipped, "none")
    t, m, h = np.array(tk), np.array(mk), np.array(hk)
    if t.size < 3 or t[-1] - t[0] < 1e9:
        eps = float(np.average(m, weights=1.0 / (h + 100.0) ** 2))
        bound = int(np.ceil(np.max(np.abs(m - eps) + h)))
        tm = float(np.average(t, weights=1.0 / (h + 100.0) ** 2))
        return PairFit(eps + s0 * (tm - t0), s0, int(round(tm)), bound, n_ab, n_ba, int(t.size), skipped, "packets")
    ym, slope, tm = _line(t, m, 1.0 / (h + 100.0) ** 2)
    bound = int(np.ceil(np.max(np.abs(ym + slope * (t - tm) - m) + h)))
    return PairFit(ym + s0 * (tm - t0), s0 + slope, int(round(tm)), bound, n_ab, n_ba, int(t.size), skipped,
                   "packets")


def refine(maps: list[ClockMap], *tables) -> list[ClockMap]:
    """The hosts' ping clocks corrected by the packets between them (in joined tables of
    the same files): from the host with the best ping bound outwards along the pairs
    with crossings (module docstring, 2)."""
    if len(maps) < 2:
        return maps
    pairs: dict[tuple[int, int], Crossings] = {}
    for table in tables:
        for k, c in crossings(table).items():
            pairs[k] = c if k not in pairs else Crossings(*(np.concatenate([getattr(pairs[k], f), getattr(c, f)])
                                                            for f in ("t", "mid", "gap_ab", "gap_ba", "hooks")))
    if not pairs:
        return maps
    errs = [m.error_ns if m.error_ns is not None else 1 << 62 for m in maps]
    ref = int(np.argmin(errs))
    out = list(maps)
    done, todo = {ref}, [ref]
    while todo:
        x = todo.pop(0)
        for (a, b), c in pairs.items():
            if x not in (a, b):
                continue
            y = b if x == a else a
            if y in done:
                continue
            f = fit_pair(c)
            if f is not None and f.source == "causality" and f.eps_ns == 0:
                continue   # one way, and no packet arrived before it left: the pings stand
            if f is None or f.source == "none":
                if f is not None and f.skipped:
                    out[y].notes.append(f"{f.skipped} window(s) of packets to and from {x} contradicted each "
                                        f"other: kept the ping clock")
                continue
            sign = 1.0 if y == b else -1.0   # fits are of b against a
            # y's error against x becomes f.bound; against the collector, x's on top
            extra = None if f.bound is None or out[x].error_ns is None else f.bound + out[x].error_ns
            if f.bound is None:
                extra = out[y].error_ns
            m = out[y].shifted(sign * f.eps_ns, sign * f.drift, f.t_ref, extra, f.source)
            m.crossings = (f.n_ab, f.n_ba) if y == b else (f.n_ba, f.n_ab)
            m.windows, m.ref = f.windows, (x if f.bound is not None else None)
            if f.source == "causality":
                m.notes.append("traffic one way only: the ping clock, moved so that no packet arrives "
                               "before it left")
            if f.skipped:
                m.notes.append(f"{f.skipped} window(s) of crossings contradicted each other and were left out")
            out[y] = m
            done.add(y)
            todo.append(y)
    return out
