"""`vnet analyze`: from numpy columns to the answer — segments, the tail named,
drops located, scheduling blamed — as a JSON-ready dict, a table and a verdict."""

from __future__ import annotations

import numpy as np

from .bulk import HostEvents
from .histogram import Log2Histogram
from .latency import TAIL_Q, stats
from .stream import PacketTable, PathRows, path_hash



def _hist(values: np.ndarray) -> dict[int, int]:
    b = np.floor(np.log2(np.maximum(values, 1))).astype(np.int64)
    counts = np.bincount(b)
    return {int(i): int(c) for i, c in enumerate(counts) if c}


def analyze(table: PacketTable, *, since: float | None = None, until: float | None = None,
            slowest: int = 0, hist: bool = False) -> dict:
    """The report of a joined trace (stream.read_table): a JSON-ready dict with a verdict."""
    t0 = table.t0
    rows = packets_between(table, since, until)
    out: dict = {
        "hosts": [{"host": h.host, "files": h.files, "records": h.records, "packet_events": n,
                   "sched_events": int(h.sched["ts"].size), "drop_events": _host_drops(table, i),
                   "clock": ({**h.clock, "applied": True} if h.clock else None),
                   "problems": h.problems + ([f"{table.late} events arrived after their packet was closed "
                                              f"(more than the join window late): counted as new packets"]
                                             if table.late and i == 0 else [])}
                  for i, (h, n) in enumerate(zip(table.hosts, table.packet_events))],
        "events": sum(p.count * len(p.hops) for p in rows), "packets": sum(p.count for p in rows),
        "duration_s": (float(table.t_last - t0) / 1e9) if table.count else 0.0,
    }
    e2e = [p.e2e() for p in rows]
    e2e_stats = [stats(lat) for lat in e2e]  # once: the paths, tail and sched joins all use them
    out["segments"] = _segment_table(table, rows, hist)
    out["paths"] = _paths(table, rows, e2e, e2e_stats, hist)
    out["drops"] = _drops(table, rows, e2e, since, until)
    out["sched"] = _sched(table, rows, e2e, e2e_stats)
    if slowest:
        out["slowest"] = _slowest(table, rows, e2e, slowest, t0)
    out["verdict"] = verdict(out)
    return out


def _host_drops(table: PacketTable, i: int) -> int:
    return int(np.count_nonzero(table.drops["host"] == i)) if table.drops else 0


def _in_window(first_ts: np.ndarray, t0: int, since: float | None, until: float | None) -> np.ndarray | None:
    if since is None and until is None:
        return None
    keep = np.ones(first_ts.size, bool)
    if since is not None:
        keep &= first_ts - t0 >= int(since * 1e9)
    if until is not None:
        keep &= first_ts - t0 < int(until * 1e9)
    return keep


def packets_between(table: PacketTable, since, until) -> list[PathRows]:
    """The paths of the packets that started inside [since, until), most common first
    (ties: by path hash, as np.unique orders them)."""
    out = []
    for p in table.paths:
        keep = _in_window(p.first_ts, table.t0, since, until)
        if keep is not None and not keep.all():
            p = p.select(keep)
        if p.count:
            out.append(p)
    out.sort(key=lambda p: (-p.count, path_hash(p.hops)))
    return out


def _segment_table(table: PacketTable, rows: list[PathRows], hist: bool) -> list[dict]:
    # every (from hop, to hop) pair: its column of deltas on each path that has it
    h = len(table.hop_names)
    cols: dict[int, list[tuple[PathRows, int]]] = {}
    for p in rows:
        for i in range(len(p.hops) - 1):
            cols.setdefault(p.hops[i] * h + p.hops[i + 1], []).append((p, i))
    out = []
    for kk in sorted(cols):
        parts = [p.column(i) for p, i in cols[kk]]  # contiguous copies of our own
        d = np.concatenate(parts) if len(parts) > 1 else parts[0]
        fa, fb = divmod(kk, h)
        if hist:
            hist_row = _hist(d)
        row = {"from": table.hop_names[fa], "to": table.hop_names[fb], **stats(d, scratch=True),
               "clock_error_ns": table.pair_error(fa, fb)}
        if hist:
            row["hist"] = hist_row
        out.append(row)
    out.sort(key=lambda r: -r["count"])
    return out


def _paths(table: PacketTable, rows: list[PathRows], e2e: list[np.ndarray], e2e_stats: list[dict],
           hist: bool) -> list[dict]:
    """Per distinct path (with at least two hops): the end-to-end distribution and
    where the time of its tail packets (end-to-end >= p99) goes, segment by segment."""
    out = []
    for p, lat, st in zip(rows, e2e, e2e_stats):
        hops = p.hops
        if len(hops) < 2:
            continue
        row = {"hops": [table.hop_names[x] for x in hops], "count": p.count, "e2e": st,
               "clock_error_ns": table.pair_error(hops[0], hops[-1])}
        if hist:
            row["hist"] = _hist(lat)
        thr = st["p99_ns"]
        tail = lat >= thr
        all_pos = [float(x) for x in p.column_sums()]
        per_pos = [float(x) for x in p.column_sums(tail)]
        total = float(lat[tail].sum())
        all_total = float(lat.sum())
        n_tail = int(np.count_nonzero(tail))
        shares = [{"from": table.hop_names[hops[i]], "to": table.hop_names[hops[i + 1]],
                   "tail_share": (per_pos[i] / total) if total else 0.0,
                   "tail_mean_ns": per_pos[i] / max(n_tail, 1),
                   "mean_share": (all_pos[i] / all_total) if all_total else 0.0,
                   "clock_error_ns": table.pair_error(hops[i], hops[i + 1])} for i in range(len(hops) - 1)]
        row["tail"] = {"quantile": TAIL_Q, "threshold_ns": thr, "packets": n_tail, "segments": shares,
                       "largest": max(range(len(shares)), key=lambda i: shares[i]["tail_share"])}
        out.append(row)
    return out


def _drops(table: PacketTable, rows: list[PathRows], e2e: list[np.ndarray], since, until) -> dict:
    """A path that is a proper prefix of a longer observed path ended early: the packet
    vanished after its last hop (or was still in flight when the trace stopped)."""
    t_end = table.t_last if table.count else 0
    ended: dict[str, dict] = {}
    in_flight = 0
    for p in rows:
        hops = p.hops
        longer = [(q.count, j) for j, q in enumerate(rows) if len(q.hops) > len(hops)
                  and q.hops[:len(hops)] == hops]
        if not longer:
            continue
        _, j = max(longer)
        q = rows[j]
        span = int(np.percentile(e2e[j], 99.9)) if q.count else 0
        late = int((p.first_ts > t_end - span).sum())
        in_flight += late
        n = p.count - late
        if n <= 0:
            continue
        last = table.hop_names[hops[-1]]
        row = ended.setdefault(last, {"last_hop": last, "next_hop": table.hop_names[q.hops[len(hops)]],
                                      "packets": 0})
        row["packets"] += n
    return {"ended_early": sorted(ended.values(), key=lambda r: -r["packets"]), "in_flight_at_end": in_flight,
            "kfree_skb": _drop_reasons(table, since, until)}


def _drop_reasons(table: PacketTable, since, until) -> list[dict]:
    d = table.drops
    if not d or not d["ts"].size:
        return []
    last = d["last_hop"]
    keep = _in_window(d["first_ts"], table.t0, since, until)
    if keep is not None:  # its packet started outside the window: as if not seen
        last = np.where(keep, last, -1)
    counts: dict[tuple[str, str], int] = {}
    for j in range(d["ts"].size):
        hop = int(last[j])
        where = table.hop_names[hop] if hop >= 0 else "(not seen at a traced hop)"
        reason = _reason_name(table.hosts[int(d["host"][j])], int(d["reason"][j]))
        counts[(reason, where)] = counts.get((reason, where), 0) + 1
    return [{"reason": r, "last_hop": h, "packets": n} for (r, h), n in sorted(counts.items(), key=lambda x: -x[1])]


def _reason_name(host: HostEvents, value: int) -> str:
    names = {int(v): str(n) for v, n in (host.header or {}).get("drop_reasons") or ()}
    return names.get(value, str(value))


def _hypervisors(table: PacketTable) -> np.ndarray:
    """Per host index, the index of the host whose threads run it (a VM guest's hypervisor,
    as the trace spec said: `hypervisor` in its request), else -1."""
    index = {h.host: i for i, h in enumerate(table.hosts)}
    return np.array([index.get(((h.header or {}).get("request") or {}).get("hypervisor"), -1)
                     for h in table.hosts] or [-1], np.int64)


def _sched(table: PacketTable, rows: list[PathRows], e2e: list[np.ndarray], e2e_stats: list[dict]) -> dict | None:
    """Join each tail packet's slowest segment with the run-queue waits ([ts - runq_ns, ts])
    of watched threads on the hosts of that segment (or on the hypervisor that runs a guest
    among them) that overlap it in time."""
    s = table.sched
    if not s or not s["ts"].size:
        return None
    # tail packets (end-to-end >= p99 of their path) and the slowest segment of each
    t_a, t_b, h_a, h_b, tail_e2e = [], [], [], [], []
    for p, lat, st in zip(rows, e2e, e2e_stats):
        if len(p.hops) < 2:
            continue
        slow = np.flatnonzero(lat >= st["p99_ns"])
        d = p.rows(slow)
        worst = np.argmax(d, axis=1)
        rows_ = np.arange(slow.size)
        before = np.cumsum(d, axis=1)[rows_, np.maximum(worst - 1, 0)]
        at = p.first_ts[slow] + np.where(worst > 0, before, 0)
        t_a.append(at)
        t_b.append(at + d[rows_, worst])
        hh = np.array(p.hops)
        h_a.append(table.hop_host[hh[worst]])
        h_b.append(table.hop_host[hh[worst + 1]])
        tail_e2e.append(lat[slow])
    if not t_a or not sum(x.size for x in t_a):
        return {"waits": int(s["ts"].size), "slow_packets": 0}
    t_a, t_b, h_a, h_b = (np.concatenate(x) for x in (t_a, t_b, h_a, h_b))
    tail_total = int(np.concatenate(tail_e2e).sum())
    # Candidate (packet, wait) pairs from sorted wait ends: a wait overlapping [t_a, t_b]
    # ends after t_a and before t_b + the longest wait. No packets x waits matrix.
    order = np.argsort(s["ts"], kind="stable")
    w_end, runq, w_host = s["ts"][order], s["runq_ns"][order], s["host"][order]
    lo = np.searchsorted(w_end, t_a, "right")
    hi = np.searchsorted(w_end, t_b + int(runq.max()), "right")
    n_pairs = hi - lo
    pk = np.repeat(np.arange(t_a.size), n_pairs)
    wi = np.arange(int(n_pairs.sum())) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs) + lo[pk]
    ov = np.minimum(t_b[pk], w_end[wi]) - np.maximum(t_a[pk], w_end[wi] - runq[wi])
    # a wait counts on its own host, and on the guests it runs (the spec's `hypervisor`)
    hv = _hypervisors(table)
    ok = (ov > 0) & ((w_host[wi] == h_a[pk]) | (w_host[wi] == h_b[pk])
                     | (w_host[wi] == hv[h_a[pk]]) | (w_host[wi] == hv[h_b[pk]]))
    pk, wi, ov = pk[ok], wi[ok], ov[ok]
    explained = np.minimum(np.bincount(pk, weights=ov, minlength=t_a.size).astype(np.int64), t_b - t_a)
    per_wait = np.bincount(wi, weights=ov, minlength=w_end.size)
    holder_ns: dict[tuple[str, int, str, int], int] = {}
    for j in np.flatnonzero(per_wait).tolist():
        k = order[j]
        key = (s["comm"][k].decode(errors="replace"), int(s["pid"][k]),
               s["prev_comm"][k].decode(errors="replace"), int(s["prev_pid"][k]))
        holder_ns[key] = holder_ns.get(key, 0) + int(per_wait[j])
    worst_total = int((t_b - t_a).sum())
    holders = sorted(holder_ns.items(), key=lambda x: -x[1])[:5]
    return {
        "waits": int(s["ts"].size), "slow_packets": int(t_a.size),
        "explained_ns": int(explained.sum()), "tail_ns": tail_total,
        "share_of_tail": explained.sum() / tail_total if tail_total else 0.0,
        "share_of_slowest_segments": explained.sum() / worst_total if worst_total else 0.0,
        "packets_with_overlap": int((explained > 0).sum()),
        "threads": [{"waiting": f"{c} ({p})", "cpu_taken_by": f"{pc} ({pp})", "overlap_ns": ns}
                    for (c, p, pc, pp), ns in holders],
    }


def _slowest(table: PacketTable, rows: list[PathRows], e2e: list[np.ndarray], n: int, t0: int) -> list[dict]:
    """The n packets with the longest end-to-end time (ties: by pkt_id, then time)."""
    lat = np.concatenate(e2e) if e2e else np.empty(0, np.int64)
    pkt = np.concatenate([p.pkt_id for p in rows]) if rows else np.empty(0, np.uint64)
    first = np.concatenate([p.first_ts for p in rows]) if rows else np.empty(0, np.int64)
    which = np.repeat(np.arange(len(rows)), [p.count for p in rows])
    row_of = np.arange(lat.size) - np.repeat(np.cumsum([p.count for p in rows]) - [p.count for p in rows],
                                             [p.count for p in rows]) if rows else np.empty(0, np.int64)
    top = np.lexsort((first, pkt, -lat))[:n]
    out = []
    for i in top.tolist():
        p, r = rows[int(which[i])], int(row_of[i])
        deltas = [0] + p.rows(np.array([r]))[0].tolist()
        out.append({"pkt_id": f"{int(pkt[i]):016x}", "t_s": (int(first[i]) - t0) / 1e9, "total_ns": int(lat[i]),
                    "hops": [{"hop": table.hop_names[h], "delta_ns": int(d)} for h, d in zip(p.hops, deltas)]})
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


def _clock_words(c: dict | None, hosts: list[str]) -> str:
    if not c:
        return "no clock estimate (its own timeline)"
    err = "±?" if c.get("error_ns") is None else f"±{_us(c['error_ns'])}"
    words = f"clock offset {c['offset_ns']} ns {err}"
    if c.get("drift_ppm"):
        words += f", drift {c['drift_ppm']:+.1f} ppm"
    how = {"ping": f"{c.get('pings', 1)} ping(s)",
           "packets": f"packets to/from {hosts[c['reference']] if c.get('reference') is not None else 'a host'}: "
                      f"{c['crossings'][0]}/{c['crossings'][1]} in {c.get('windows', 1)} window(s)",
           "causality": f"pings, moved so that none of {sum(c.get('crossings', []))} one-way packets arrives "
                        f"before it left"}.get(c.get("source"))
    return words + (f" (from {how})" if how else "")


def render_text(r: dict, hist: bool = False) -> list[str]:
    lines = []
    for h in r["hosts"]:
        clock = _clock_words(h["clock"], [x["host"] for x in r["hosts"]])
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
                  "  end-to-end: " + " ".join(f"{c.removesuffix('_ns')} {_us(e[c])}" for c in cols[1:])
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
