"""`vnet analyze`: from numpy columns to the answer — segments, the tail named,
drops located, scheduling blamed — as a JSON-ready dict, a table and a verdict."""

from __future__ import annotations

import numpy as np

from .bulk import HostEvents
from .histogram import Log2Histogram
from .latency import TAIL_Q, Instances, Segments, Timeline, join, merge, path_ids, segments, stats



def _hist(values: np.ndarray) -> dict[int, int]:
    b = np.floor(np.log2(np.maximum(values, 1))).astype(np.int64)
    counts = np.bincount(b)
    return {int(i): int(c) for i, c in enumerate(counts) if c}


def analyze(hosts: list[HostEvents], *, since: float | None = None, until: float | None = None,
            slowest: int = 0, hist: bool = False) -> dict:
    tl = merge(hosts)
    inst = join(tl)
    tl.release()  # the sorted copies in inst are all that is used from here
    t0 = tl.t0
    if inst.count and (since is not None or until is not None):
        first = inst.first_ts() - t0
        keep = np.ones(inst.count, bool)
        if since is not None:
            keep &= first >= int(since * 1e9)
        if until is not None:
            keep &= first < int(until * 1e9)
        inst = inst.select(keep)
    segs = segments(inst)
    pidx, phops, pcounts = path_ids(inst)
    e2e = inst.e2e()
    out: dict = {
        "hosts": [{"host": h.host, "files": h.files, "records": h.records, "packet_events": int(h.ts.size),
                   "sched_events": int(h.sched["ts"].size), "drop_events": int(h.drops["ts"].size),
                   "clock": ({**h.clock, "applied": True} if h.clock else None), "problems": h.problems}
                  for h in hosts],
        "events": int(inst.ts.size), "packets": inst.count,
        "duration_s": (float(tl.t_last - t0) / 1e9) if tl.count else 0.0,
    }
    out["segments"] = _segment_table(tl, inst, segs, hist)
    out["paths"] = _paths(tl, inst, segs, pidx, phops, pcounts, e2e, hist)
    out["drops"] = _drops(tl, inst, pidx, phops, pcounts, e2e)
    out["sched"] = _sched(tl, inst, segs, pidx, e2e, out["paths"])
    if slowest:
        out["slowest"] = _slowest(tl, inst, e2e, slowest, t0)
    out["verdict"] = verdict(out)
    return out


def _segment_table(tl: Timeline, inst: Instances, segs: Segments, hist: bool) -> list[dict]:
    # Segments grouped by (from hop, to hop): a few distinct pairs, so one mask per pair
    # (no sort of all segments); percentiles do not depend on the order inside a group.
    h = len(tl.hop_names)
    kt = np.int32 if h * h < 1 << 31 else np.int64
    key = inst.hop[segs.src].astype(kt)
    key *= h
    key += inst.hop[segs.src + 1]
    uniq = np.flatnonzero(np.bincount(key)) if h * h <= 1 << 24 and key.size else np.unique(key)
    rows = []
    for kk in uniq.tolist():
        d = segs.delta[key == kk] if uniq.size > 1 else segs.delta
        fa, fb = divmod(kk, h)
        row = {"from": tl.hop_names[fa], "to": tl.hop_names[fb], **stats(d),
               "clock_error_ns": tl.pair_error(fa, fb)}
        if hist:
            row["hist"] = _hist(d)
        rows.append(row)
    rows.sort(key=lambda r: -r["count"])
    return rows


def _paths(tl, inst, segs, pidx, phops, pcounts, e2e, hist) -> list[dict]:
    """Per distinct path (with at least two hops): the end-to-end distribution and
    where the time of its tail packets (end-to-end >= p99) goes, segment by segment."""
    out = []
    for p, (hops, count) in enumerate(zip(phops, pcounts)):
        if len(hops) < 2:
            continue
        mine = np.flatnonzero(pidx == p)
        lat = e2e[mine]
        st = stats(lat)
        row = {"hops": [tl.hop_names[h] for h in hops], "count": int(count), "e2e": st,
               "clock_error_ns": tl.pair_error(hops[0], hops[-1])}
        if hist:
            row["hist"] = _hist(lat)
        thr = st["p99_ns"]
        tail = lat >= thr
        # every instance on the path has its hops: segment i of all of them by one gather
        # per position (no per-segment temporaries); integer sums, exact
        first = inst.start[mine]
        per_pos, all_pos = [], []
        for i in range(len(hops) - 1):
            d = inst.ts[first + (i + 1)] - inst.ts[first + i]
            all_pos.append(float(int(d.sum())))
            per_pos.append(float(int(d[tail].sum())))
        total = float(lat[tail].sum())
        all_total = float(lat.sum())
        n_tail = int(np.count_nonzero(tail))
        shares = [{"from": tl.hop_names[hops[i]], "to": tl.hop_names[hops[i + 1]],
                   "tail_share": (per_pos[i] / total) if total else 0.0,
                   "tail_mean_ns": per_pos[i] / max(n_tail, 1),
                   "mean_share": (all_pos[i] / all_total) if all_total else 0.0,
                   "clock_error_ns": tl.pair_error(hops[i], hops[i + 1])} for i in range(len(hops) - 1)]
        row["tail"] = {"quantile": TAIL_Q, "threshold_ns": thr, "packets": n_tail, "segments": shares,
                       "largest": max(range(len(shares)), key=lambda i: shares[i]["tail_share"])}
        out.append(row)
    return out


def _drops(tl, inst, pidx, phops, pcounts, e2e) -> dict:
    """A path that is a proper prefix of a longer observed path ended early: the packet
    vanished after its last hop (or was still in flight when the trace stopped)."""
    t_end = tl.t_last if tl.count else 0
    first = inst.first_ts()
    ended: dict[str, dict] = {}
    in_flight = 0
    for p, hops in enumerate(phops):
        longer = [(int(c), q) for q, (h, c) in enumerate(zip(phops, pcounts)) if len(h) > len(hops)
                  and h[:len(hops)] == hops]
        if not longer:
            continue
        _, q = max(longer)
        span = int(np.percentile(e2e[pidx == q], 99.9)) if pcounts[q] else 0
        mine = np.flatnonzero(pidx == p)
        late = int((first[mine] > t_end - span).sum())
        in_flight += late
        n = mine.size - late
        if n <= 0:
            continue
        last = tl.hop_names[hops[-1]]
        row = ended.setdefault(last, {"last_hop": last, "next_hop": tl.hop_names[phops[q][len(hops)]],
                                      "packets": 0})
        row["packets"] += n
    reasons = _drop_reasons(tl, inst)
    return {"ended_early": sorted(ended.values(), key=lambda r: -r["packets"]), "in_flight_at_end": in_flight,
            "kfree_skb": reasons}


def _drop_reasons(tl: Timeline, inst: Instances) -> list[dict]:
    d = tl.drops
    if not d["ts"].size:
        return []
    # each drop's packet: the last hop it was seen at before it was freed
    firsts = inst.pkt_id[inst.start[:-1]]
    k = np.searchsorted(firsts, d["pkt_id"]) if firsts.size else np.zeros(d["ts"].size, np.int64)
    rows: dict[tuple[str, str], int] = {}
    for j in range(d["ts"].size):
        i = int(k[j])
        last = "(not seen at a traced hop)"
        if i < firsts.size and firsts[i] == d["pkt_id"][j]:
            seg = slice(int(inst.start[i]), int(inst.start[i + 1]))
            before = np.flatnonzero(inst.ts[seg] <= d["ts"][j])
            if before.size:
                last = tl.hop_names[int(inst.hop[seg][before[-1]])]
        host = tl.hosts[int(d["host"][j])]
        reason = _reason_name(host, int(d["reason"][j]))
        rows[(reason, last)] = rows.get((reason, last), 0) + 1
    return [{"reason": r, "last_hop": h, "packets": n} for (r, h), n in sorted(rows.items(), key=lambda x: -x[1])]


def _reason_name(host: HostEvents, value: int) -> str:
    names = {int(v): str(n) for v, n in (host.header or {}).get("drop_reasons") or ()}
    return names.get(value, str(value))


def _sched(tl, inst, segs, pidx, e2e, paths) -> dict | None:
    """Join each tail packet's slowest segment with the run-queue waits ([ts - runq_ns, ts])
    of watched threads on the hosts of that segment that overlap it in time."""
    s = tl.sched
    if not s or not s["ts"].size:
        return None
    # tail packets: end-to-end >= p99 of their path
    thr = np.full(len(set(pidx.tolist())) + 1 if pidx.size else 1, np.iinfo(np.int64).max, np.int64)
    for p in np.unique(pidx):
        thr[p] = stats(e2e[pidx == p])["p99_ns"] if (pidx == p).sum() else thr[p]
    slow = np.flatnonzero(e2e >= thr[pidx]) if pidx.size else np.empty(0, np.int64)
    slow = slow[inst.sizes[slow] >= 2]
    if not slow.size:
        return {"waits": int(s["ts"].size), "slow_packets": 0}
    # each slow packet's slowest segment
    mask = np.zeros(inst.count, bool)
    mask[slow] = True
    sel = np.flatnonzero(mask[segs.inst])
    o = np.lexsort((-segs.delta[sel], segs.inst[sel]))
    sel = sel[o]
    firsts = np.r_[True, segs.inst[sel][1:] != segs.inst[sel][:-1]]
    worst = sel[firsts]
    a = segs.src[worst]
    t_a, t_b = inst.ts[a], inst.ts[a + 1]
    h_a, h_b = tl.hop_host[inst.hop[a]], tl.hop_host[inst.hop[a + 1]]
    # Candidate (packet, wait) pairs from sorted wait ends: a wait overlapping [t_a, t_b]
    # ends after t_a and before t_b + the longest wait. No packets x waits matrix.
    order = np.argsort(s["ts"], kind="stable")
    w_end, runq, w_host = s["ts"][order], s["runq_ns"][order], s["host"][order]
    lo = np.searchsorted(w_end, t_a, "right")
    hi = np.searchsorted(w_end, t_b + int(runq.max()), "right")
    n_pairs = hi - lo
    pk = np.repeat(np.arange(worst.size), n_pairs)
    wi = np.arange(int(n_pairs.sum())) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs) + lo[pk]
    ov = np.minimum(t_b[pk], w_end[wi]) - np.maximum(t_a[pk], w_end[wi] - runq[wi])
    ok = (ov > 0) & ((w_host[wi] == h_a[pk]) | (w_host[wi] == h_b[pk]))
    pk, wi, ov = pk[ok], wi[ok], ov[ok]
    explained = np.minimum(np.bincount(pk, weights=ov, minlength=worst.size).astype(np.int64), t_b - t_a)
    per_wait = np.bincount(wi, weights=ov, minlength=w_end.size)
    holder_ns: dict[tuple[str, int, str, int], int] = {}
    for j in np.flatnonzero(per_wait).tolist():
        k = order[j]
        key = (s["comm"][k].decode(errors="replace"), int(s["pid"][k]),
               s["prev_comm"][k].decode(errors="replace"), int(s["prev_pid"][k]))
        holder_ns[key] = holder_ns.get(key, 0) + int(per_wait[j])
    tail_total = int(e2e[slow].sum())
    worst_total = int((t_b - t_a).sum())
    holders = sorted(holder_ns.items(), key=lambda x: -x[1])[:5]
    return {
        "waits": int(s["ts"].size), "slow_packets": int(slow.size),
        "explained_ns": int(explained.sum()), "tail_ns": tail_total,
        "share_of_tail": explained.sum() / tail_total if tail_total else 0.0,
        "share_of_slowest_segments": explained.sum() / worst_total if worst_total else 0.0,
        "packets_with_overlap": int((explained > 0).sum()),
        "threads": [{"waiting": f"{c} ({p})", "cpu_taken_by": f"{pc} ({pp})", "overlap_ns": ns}
                    for (c, p, pc, pp), ns in holders],
    }


def _slowest(tl: Timeline, inst: Instances, e2e: np.ndarray, n: int, t0: int) -> list[dict]:
    top = np.argsort(-e2e, kind="stable")[:n]
    out = []
    for i in top.tolist():
        lo, hi = int(inst.start[i]), int(inst.start[i + 1])
        ts, hops = inst.ts[lo:hi], inst.hop[lo:hi]
        out.append({"pkt_id": f"{int(inst.pkt_id[lo]):016x}", "t_s": (int(ts[0]) - t0) / 1e9,
                    "total_ns": int(e2e[i]),
                    "hops": [{"hop": tl.hop_names[int(h)], "delta_ns": int(t - ts[max(k - 1, 0)])}
                             for k, (h, t) in enumerate(zip(hops.tolist(), ts.tolist()))]})
    return out


# -- words ----------------------------------------------------------------------------------------------


def _us(ns: float | int | None) -> str:
    if ns is None:
        return "?"
    return f"{ns / 1000:.1f}us" if ns < 10_000_000 else f"{ns / 1e6:.1f}ms"


def _err(e: int | None) -> str:
    if e == 0:
        return ""
    return " (clock error unknown: no clock estimate for a host)" if e is None else f" (±{_us(e)} clock error)"


def verdict(r: dict) -> str:
    if not r["paths"]:
        return ("No packet was seen at two hops: no path to measure." if r["packets"] else
                "No packet events in these files.")
    p = r["paths"][0]
    tail = p["tail"]
    big = tail["segments"][tail["largest"]]
    e = p["e2e"]
    words = (f"On the most common path ({' -> '.join(p['hops'])}; {p['count']} packets), end-to-end latency is "
             f"p50 {_us(e['p50_ns'])}, p99 {_us(e['p99_ns'])}, max {_us(e['max_ns'])}{_err(p['clock_error_ns'])}. "
             f"{big['tail_share'] * 100:.0f}% of the latency of its p99 tail ({tail['packets']} packets at or above "
             f"{_us(tail['threshold_ns'])}) accrues between {big['from']} and {big['to']}{_err(big['clock_error_ns'])}"
             f" (that segment takes {big['mean_share'] * 100:.0f}% on average).")
    d = r["drops"]
    if d["ended_early"]:
        top = d["ended_early"][0]
        words += (f" {sum(x['packets'] for x in d['ended_early'])} packets vanished early, most after "
                  f"{top['last_hop']} ({top['packets']}, next expected {top['next_hop']}).")
    if d["kfree_skb"]:
        k = d["kfree_skb"][0]
        words += f" The kernel dropped packets mostly for {k['reason']} after {k['last_hop']} ({k['packets']})."
    s = r["sched"]
    if s and s.get("slow_packets"):
        words += (f" Run-queue waits of watched threads overlap the slowest segment of "
                  f"{s['packets_with_overlap']} of {s['slow_packets']} tail packets and explain "
                  f"{s['share_of_tail'] * 100:.0f}% of their end-to-end time")
        if s["threads"]:
            t = s["threads"][0]
            words += f", mostly {t['waiting']} waiting while {t['cpu_taken_by']} had its CPU"
        words += "."
    return words


def render_text(r: dict, hist: bool = False) -> list[str]:
    lines = []
    for h in r["hosts"]:
        clock = (f"clock offset {h['clock']['offset_ns']} ns ±{_us(h['clock']['error_ns'])}" if h["clock"]
                 else "no clock estimate (its own timeline)")
        lines.append(f"host {h['host']}: {h['packet_events']} packet events, {h['sched_events']} sched, "
                     f"{h['drop_events']} drops, {len(h['files'])} file(s); {clock}")
        lines += [f"  warning: {p}" for p in h["problems"]]
    lines.append(f"{r['packets']} packets, {r['events']} events on paths, {r['duration_s']:.3f} s")
    lines.append("")
    cols = ("count", "min_ns", "p50_ns", "p90_ns", "p99_ns", "p999_ns", "max_ns")
    head = f"{'segment':<60} {'count':>8} " + " ".join(f"{c.removesuffix('_ns').replace('p999', 'p99.9'):>9}"
                                                       for c in cols[1:])
    lines.append(head)
    for s in r["segments"]:
        name = f"{s['from']} -> {s['to']}"
        lines.append(f"{name:<60} {s['count']:>8} " + " ".join(f"{_us(s[c]):>9}" for c in cols[1:])
                     + _err(s["clock_error_ns"]))
        if hist:
            lines += ["    " + ln for ln in Log2Histogram(s["hist"]).render()]
    for p in r["paths"][:10]:
        e = p["e2e"]
        lines += ["", f"path ({p['count']} packets): {' -> '.join(p['hops'])}",
                  f"  end-to-end: " + " ".join(f"{c.removesuffix('_ns')} {_us(e[c])}" for c in cols[1:])
                  + _err(p["clock_error_ns"]),
                  f"  p99 tail ({p['tail']['packets']} packets >= {_us(p['tail']['threshold_ns'])}): share of time"]
        for i, s in enumerate(p["tail"]["segments"]):
            mark = " <- largest" if i == p["tail"]["largest"] else ""
            lines.append(f"    {s['tail_share'] * 100:5.1f}% (mean {s['mean_share'] * 100:5.1f}%) "
                         f"{s['from']} -> {s['to']}{mark}")
        if hist:
            lines += ["    " + ln for ln in Log2Histogram(p["hist"]).render()]
    d = r["drops"]
    if d["ended_early"] or d["kfree_skb"] or d["in_flight_at_end"]:
        lines += ["", "drops:"]
        lines += [f"  {x['packets']:>8} vanished after {x['last_hop']} (next expected {x['next_hop']})"
                  for x in d["ended_early"]]
        if d["in_flight_at_end"]:
            lines.append(f"  {d['in_flight_at_end']:>8} still in flight when the trace ended (not counted)")
        lines += [f"  {x['packets']:>8} kfree_skb {x['reason']} after {x['last_hop']}" for x in d["kfree_skb"]]
    s = r["sched"]
    if s:
        lines += ["", f"scheduling: {s['waits']} run-queue waits; {s.get('slow_packets', 0)} tail packets"]
        if s.get("slow_packets"):
            lines.append(f"  run-queue wait inside their slowest segment: {_us(s['explained_ns'])} of "
                         f"{_us(s['tail_ns'])} tail time ({s['share_of_tail'] * 100:.1f}%; "
                         f"{s['share_of_slowest_segments'] * 100:.1f}% of the slowest segments)")
            lines += [f"  {t['waiting']} waited {_us(t['overlap_ns'])}; the CPU went to it from {t['cpu_taken_by']}"
                      for t in s["threads"]]
    if r.get("slowest"):
        lines += ["", "slowest packets:"]
        for p in r["slowest"]:
            lines.append(f"  pkt_id {p['pkt_id']} at {p['t_s']:.6f}s total {_us(p['total_ns'])}"
                         + (f"  {p['flow']}" if p.get("flow") else ""))
            lines += [f"    {'+' + _us(h['delta_ns']) if k else '':>10}  {h['hop']}" for k, h in enumerate(p["hops"])]
    lines += ["", r["verdict"]]
    return lines
