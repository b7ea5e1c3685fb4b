"""Request/response pairing: each request joined with its reply into one round trip.

A request's path ends where the far end took it (a VM's tap read, a socket), and
its reply's path starts where the far end answered; the time between the two —
the far end's turnaround: a VM waking, waiting for its vCPU thread, its guest
working — is in neither packet. Pairing puts it on one timeline::

    request hops ... -> [turnaround] -> reply hops ...

and the result is an ordinary `PacketTable` whose paths are round trips, so the
report (segments, the tail named, run-queue waits joined with the slowest
segment) reads it unchanged.

The rule: requests and replies of one conversation (the flow filter and its
reverse) are answered in order; each reply pairs with the oldest unanswered
request whose last sighting is before the reply's first one. A request older
than `max_wait_ns` when a later reply arrives is counted as unanswered. A request
whose path stops short of another request path (it vanished on the way, a full
socket queue say, or its last event was lost) takes a reply only when no whole
request is waiting for one; left over, it is counted as vanished. A lost
reply therefore shifts the pairs behind it until that timeout: `pairing` in the
result counts unanswered requests and unpaired replies so that a shifted pairing
never goes unnoticed; filter to one client (`--src`) when several share a port.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np

from .bulk import Flow
from .stream import GAP_NS, PacketTable, PathRows

REPLY_SUFFIX = " (reply)"


def reverse(flow: Flow) -> Flow:
    """The flow of the replies: addresses and ports swapped."""
    return replace(flow, src=flow.dst, dst=flow.src, sport=flow.dport, dport=flow.sport)


def _ends(table: PacketTable) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every packet: first time, last time, path index, row in its path."""
    paths = table.paths
    first = np.concatenate([p.first_ts for p in paths]) if paths else np.empty(0, np.int64)
    last = first + (np.concatenate([p.e2e() for p in paths]) if paths else np.empty(0, np.int64))
    which = np.repeat(np.arange(len(paths)), [p.count for p in paths])
    row = np.concatenate([np.arange(p.count) for p in paths]) if paths else np.empty(0, np.int64)
    return first, last, which, row


def stopped_short(table: PacketTable) -> np.ndarray:
    """Per packet (_ends order): whether its path is the start of another path of the table:
    a request that vanished on the way (dropped, or a socket's queue full) before the point
    where the others were taken, or whose last event was lost."""
    hops = [p.hops for p in table.paths]
    short = [any(len(o) > len(h) and o[:len(h)] == h for o in hops) for h in hops]
    return np.repeat(np.array(short, bool), [p.count for p in table.paths]) if hops else np.zeros(0, bool)


def pair(requests: PacketTable, replies: PacketTable, max_wait_ns: int = GAP_NS) -> tuple[np.ndarray, np.ndarray,
                                                                                             dict]:
    """Indexes (into _ends order) of paired requests and replies, and the counts."""
    return _pair(_ends(requests)[1], _ends(replies)[0], max_wait_ns, stopped_short(requests))


def _pair(q_last: np.ndarray, r_first: np.ndarray, max_wait_ns: int,
          short: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """pair() on the requests' last and the replies' first times. A request that stopped
    short (stopped_short) takes a reply only when no whole one is waiting: one whose last
    event was lost still gets its answer, one dropped on the way takes none (vanished)."""
    q_order = np.lexsort((np.arange(q_last.size), q_last))
    r_order = np.argsort(r_first, kind="stable")
    q_sorted, r_sorted = q_last[q_order].tolist(), r_first[r_order].tolist()
    cut = (short[q_order] if short is not None else np.zeros(q_last.size, bool)).tolist()
    whole: deque[int] = deque()
    part: deque[int] = deque()
    qi, unanswered, unsolicited, vanished = 0, 0, 0, 0
    got_q, got_r = [], []
    for k, t in enumerate(r_sorted):
        while qi < len(q_sorted) and q_sorted[qi] < t:
            (part if cut[qi] else whole).append(qi)
            qi += 1
        for waiting in (whole, part):
            while waiting and t - q_sorted[waiting[0]] > max_wait_ns:
                waiting.popleft()
                unanswered += 1
                vanished += waiting is part
        waiting = whole or part
        if not waiting:
            unsolicited += 1
            continue
        got_q.append(waiting.popleft())
        got_r.append(k)
    vanished += len(part) + sum(cut[qi:])
    unanswered += len(whole) + len(part) + (len(q_sorted) - qi)
    counts = {"requests": int(q_last.size), "replies": int(r_first.size), "pairs": len(got_q),
              "unanswered_requests": unanswered, "unpaired_replies": unsolicited, "vanished_requests": vanished}
    return q_order[np.array(got_q, np.int64)], r_order[np.array(got_r, np.int64)], counts


def round_trips(requests: PacketTable, replies: PacketTable, max_wait_ns: int = GAP_NS) -> tuple[PacketTable, dict]:
    """The round trips as a PacketTable (a path per request path x reply path), and the
    pairing counts. Both tables must come from the same files (read_table with a flow
    and its reverse)."""
    if [x.host for x in requests.hosts] != [x.host for x in replies.hosts]:
        raise ValueError("requests and replies were not read from the same trace files")
    q_first, q_last, q_path, q_row = _ends(requests)
    r_first, _, r_path, r_row = _ends(replies)
    qi, ri, counts = _pair(q_last, r_first, max_wait_ns, stopped_short(requests))
    h = len(requests.hop_names)
    on_request = {requests.hop_names[x] for p in requests.paths for x in p.hops}
    names = list(requests.hop_names) + [n + REPLY_SUFFIX if n in on_request else n for n in replies.hop_names]
    hop_host = np.concatenate([requests.hop_host, replies.hop_host])
    paths = []
    n_rep = max(len(replies.paths), 1)
    combo = q_path[qi].astype(np.int64) * n_rep + r_path[ri]
    for key in np.unique(combo).tolist():
        sel = np.flatnonzero(combo == key)
        qp, rp = requests.paths[key // n_rep], replies.paths[key % n_rep]
        qrows, rrows = q_row[qi[sel]], r_row[ri[sel]]
        turn = (r_first[ri[sel]] - q_last[qi[sel]])[:, None]
        deltas = np.concatenate([_rows_in_order(qp, qrows), turn, _rows_in_order(rp, rrows)], axis=1)
        order = np.argsort(q_first[qi[sel]], kind="stable")
        paths.append(PathRows(tuple(qp.hops) + tuple(h + x for x in rp.hops),
                              [(q_first[qi[sel]][order], qp.pkt_id[qrows][order], deltas[order])]))
    read = [t for t in (requests, replies) if t.count]  # both tables' events, drops and times
    table = PacketTable(paths, names, hop_host, requests.hosts, requests.error_ns, requests.offset_ns,
                        _both_drops(requests.drops, replies.drops, h), requests.sched,
                        min((t.t_first for t in read), default=0), max((t.t_last for t in read), default=0),
                        requests.count + replies.count,
                        [a + b for a, b in zip(requests.packet_events, replies.packet_events)],
                        requests.late + replies.late, requests.clocks)
    return table, counts


def _rows_in_order(p: PathRows, rows: np.ndarray) -> np.ndarray:
    """p.rows() of rows in any order (it reads ascending indexes), in the order given."""
    return p.rows(np.sort(rows))[np.argsort(np.argsort(rows))]


def _both_drops(q: dict, r: dict, h: int) -> dict:
    """The requests' and the replies' kfree_skb drops, a reply's last hop renumbered as in
    the round trips' hop names."""
    if not r or not r["ts"].size:
        return q
    r = {**r, "last_hop": np.where(r["last_hop"] >= 0, r["last_hop"] + h, r["last_hop"])}
    return {k: np.concatenate([q[k], v]) for k, v in r.items()} if q else r


def describe(counts: dict) -> str:
    """One sentence on the pairing, with a warning when it may be shifted."""
    words = (f"{counts['pairs']} round trips paired from {counts['requests']} requests and "
             f"{counts['replies']} replies (in order).")
    gone = counts.get("vanished_requests") or 0
    if gone:
        words += (f" {gone} requests vanished on the way (their paths stop short of the others': see the drops) "
                  f"and were not paired.")
    if counts["unanswered_requests"] - gone or counts["unpaired_replies"]:
        words += (f" {counts['unanswered_requests'] - gone} requests got no reply and {counts['unpaired_replies']} "
                  f"replies had no request: pairs after a lost reply may be shifted until it timed out.")
    return words
