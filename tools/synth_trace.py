#!/usr/bin/env python3
"""Synthetic trace files with known latencies, for tests and benchmarks of `vnet analyze`.

N packets cross K device hooks (split over 1 or 2 hosts); segment i takes delays[i]
ns (+ uniform jitter below `jitter_ns`); a fraction of packets gets `extra_ns` more on
one segment (the injected delay, with a run-queue wait of a "vhost" thread covering it
when `sched`); a fraction vanishes after one hop (with a kfree_skb event). Host 1's
clock runs `offset_ns` ahead of host 0's (the collector's), and its file says so in a
"clock" chunk, as the collector writes it.

Records are laid out by the real objects' BTF (tracefile.abi_from_btf) and framed as
the ring does (ringbatch), so the files are what `vnet collect` / `vnet trace -w` write.

    .venv/bin/python tools/synth_trace.py OUTDIR --packets 100000 --hooks 4 --hosts 2
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vnet.binding import Btf
from vnet.binding.ringbatch import pack_records
from vnet.collector.tracefile import TraceFileWriter, abi_from_btf, labels_to_list
from vnet.objects import object_path

T0 = 1_000_000_000_000  # the collector's monotonic clock at the first packet
DROP_REASONS = [[2, "NOT_SPECIFIED"], [6, "NETFILTER_DROP"]]


@dataclass
class Spec:
    packets: int = 1000
    hooks: int = 4
    hosts: int = 1
    delays_ns: list[int] = field(default_factory=lambda: [5_000, 20_000, 8_000])
    jitter_ns: int = 0
    gap_ns: int = 10_000                 # between packet starts
    inject_segment: int | None = 1
    extra_ns: int = 200_000
    inject_fraction: float = 0.02
    drop_after: int | None = None        # hop index after which some packets vanish
    drop_fraction: float = 0.0
    sched: bool = True
    offset_ns: int = 3_000_000_000       # host 1's clock minus host 0's
    error_ns: int = 1_500
    chunk_records: int = 4096
    seed: int = 1

    def host_of(self, hop: int) -> int:
        return 0 if self.hosts == 1 else int(hop >= (self.hooks + 1) // 2)

    def hop_name(self, hop: int) -> str:
        return f"dev:h{self.host_of(hop)}/eth{hop}:ingress"


@dataclass
class Truth:
    """What the files hold, for checks: per-packet hop times on the collector's clock."""

    times: np.ndarray           # packets x hooks, ns; -1 where the packet never got there
    injected: np.ndarray        # bool per packet
    dropped: np.ndarray         # bool per packet
    pkt_ids: np.ndarray


def _abi() -> tuple[dict, Btf]:
    btf = Btf.from_file(str(object_path("tc_trace")))
    return abi_from_btf(btf), btf


def generate(spec: Spec) -> Truth:
    rng = np.random.default_rng(spec.seed)
    n, k = spec.packets, spec.hooks
    if len(spec.delays_ns) != k - 1:
        raise ValueError(f"{k} hooks need {k - 1} delays, got {len(spec.delays_ns)}")
    d = np.tile(np.array(spec.delays_ns, np.int64), (n, 1))
    if spec.jitter_ns:
        d += rng.integers(0, spec.jitter_ns, (n, k - 1))
    injected = np.zeros(n, bool)
    if spec.inject_segment is not None:
        injected = rng.random(n) < spec.inject_fraction
        d[injected, spec.inject_segment] += spec.extra_ns
    times = T0 + np.arange(n, dtype=np.int64)[:, None] * spec.gap_ns + np.c_[np.zeros(n, np.int64), d.cumsum(1)]
    dropped = np.zeros(n, bool)
    if spec.drop_after is not None:
        dropped = (rng.random(n) < spec.drop_fraction) & (np.arange(n) < n * 0.9)  # not in flight at the end
        times[dropped, spec.drop_after + 1:] = -1
    ids = rng.integers(1, 2**63, n, dtype=np.int64).astype(np.uint64)
    return Truth(times, injected, dropped, ids)


def write(spec: Spec, out: Path, truth: Truth | None = None) -> tuple[list[Path], Truth]:
    """One trace file per host in `out` (OUT/HOST.vnt, as the collector names them)."""
    truth = truth if truth is not None else generate(spec)
    abi, btf = _abi()
    ev = btf.struct("vnet_event")
    sched_layout = btf.struct("vnet_sched_event")
    kinds = btf.enum("vnet_event_kind")
    hooks_enum = btf.enum("vnet_hook")
    flags = btf.enum("vnet_event_flag")
    from vnet.analysis.bulk import dtype_of

    more_layout = btf.struct("vnet_event_more")  # drops: the record with the reason

    def framed(layout):
        size = (layout.size + 8 + 7) & ~7
        return np.dtype({"names": ["len_flags", "ev"], "formats": [np.uint32, dtype_of(layout)], "offsets": [0, 8],
                         "itemsize": size})

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for h in range(spec.hosts):
        hops = [i for i in range(spec.hooks) if spec.host_of(i) == h]
        drop_probe = spec.hooks  # probe_id of drop:kfree_skb
        labels = {(i, hooks_enum["VNET_HOOK_TC_INGRESS"]): {"probe": spec.hop_name(i), "layer": "device"}
                  for i in hops}
        labels[(drop_probe, None)] = {"probe": "drop:kfree_skb", "layer": "drops"}
        labels[(drop_probe + 1, None)] = {"probe": "sched:runq", "layer": "sched"}
        header = {"trace": "synth", "host": f"h{h}", "kernel": "synthetic", "abi": abi,
                  "probes": [{"probe": spec.hop_name(i), "hook": "tcx"} for i in hops],
                  "labels": labels_to_list(labels), "clock": {"wall_offset_ns": 1_700_000_000_000_000_000},
                  "ifnames": [], "drop_reasons": DROP_REASONS}
        offset = spec.offset_ns if h else 0
        # packet events of this host's hops, in time order (as a ring would hand them over)
        cols = []
        for i in hops:
            t = truth.times[:, i]
            ok = t >= 0
            cols.append((t[ok], truth.pkt_ids[ok], np.full(ok.sum(), i)))
        if spec.drop_after is not None and spec.host_of(spec.drop_after) == h:
            dr = truth.dropped
            t = truth.times[dr, spec.drop_after] + 1_000
            cols.append((t, truth.pkt_ids[dr], np.full(dr.sum(), drop_probe)))
        ts = np.concatenate([c[0] for c in cols]) + offset
        pid = np.concatenate([c[1] for c in cols])
        probe = np.concatenate([c[2] for c in cols])
        order = np.argsort(ts, kind="stable")
        ts, pid, probe = ts[order], pid[order], probe[order]
        is_drop = probe == drop_probe
        parts = []
        for layout, sel, kind in ((ev, ~is_drop, "VNET_KIND_PACKET"), (more_layout, is_drop, "VNET_KIND_PACKET_MORE")):
            recs = np.zeros(int(sel.sum()), framed(layout))
            recs["len_flags"] = layout.size
            e = recs["ev"]
            e["ts_ns"], e["pkt_id"], e["probe_id"] = ts[sel], pid[sel], probe[sel]
            e["kind"] = kinds[kind]
            e["hook"] = hooks_enum["VNET_HOOK_TP_BTF" if layout is more_layout else "VNET_HOOK_TC_INGRESS"]
            if layout is more_layout:
                e["reason"] = 6
                e["skb_addr"] = 0xFFFF888000000000
            e["eth_proto"], e["l4_proto"], e["len"] = 0x0800, 17, 100
            e["flags"] = flags["VNET_F_IPV4"] | flags["VNET_F_PORTS"]
            e["sport"], e["dport"], e["ttl"] = 5000, 6000, 64
            e["saddr"] = bytes([10, 0, 0, 1]) + bytes(12)
            e["daddr"] = bytes([10, 0, 0, 2]) + bytes(12)
            parts.append((recs.tobytes(), recs.dtype.itemsize))
        blob, ends = _interleave(is_drop, parts)
        sched_recs = _sched_records(spec, truth, h, offset, sched_layout, kinds, drop_probe + 1) if spec.sched else []
        path = out / f"h{h}.vnt"
        with TraceFileWriter(path, header) as w:
            seq = 0
            for lo in range(0, ts.size, spec.chunk_records):
                hi = min(lo + spec.chunk_records, ts.size)
                part = bytes(memoryview(blob)[(ends[lo - 1] if lo else 0):ends[hi - 1]])
                count = hi - lo
                if lo == 0 and sched_recs:  # mixed packet and sched records in one blob
                    part += pack_records(sched_recs, discarded=[0])
                    count += len(sched_recs) - 1
                w.write("events", seq=seq, records=part, count=count)
                seq += 1
            if spec.hosts > 1:  # a coarse estimate first, then the best one, as the collector writes them
                w.write("clock", offset_ns=offset + 40_000, error_ns=50_000)
                w.write("clock", offset_ns=offset, error_ns=spec.error_ns)
            w.write("end", seq=seq, losses={})
        paths.append(path)
    btf.close()
    return paths, truth


def _interleave(is_drop: np.ndarray, parts: list[tuple[bytes, int]]) -> tuple[bytearray, np.ndarray]:
    """The records of both kinds in time order, as a ring hands them over: (the blob, each
    record's end offset). parts: (packed records, record size) of the others, then of the drops."""
    sizes = np.where(is_drop, parts[1][1], parts[0][1]).astype(np.int64)
    ends = np.cumsum(sizes)
    blob = bytearray(int(ends[-1]) if ends.size else 0)
    bounds = [0, *(np.flatnonzero(np.diff(is_drop.astype(np.int8))) + 1).tolist(), is_drop.size]
    taken = [0, 0]
    for a, b in zip(bounds[:-1], bounds[1:]):  # one copy per run of one kind
        if a == b:
            continue
        which = int(is_drop[a])
        data, size = parts[which]
        start = int(ends[a - 1]) if a else 0
        blob[start:int(ends[b - 1])] = data[taken[which] * size:(taken[which] + b - a) * size]
        taken[which] += b - a
    return blob, ends


def _sched_records(spec, truth, h, offset, layout, kinds, probe_id) -> list[bytes]:
    """A run-queue wait of the vhost thread covering the injected extra delay of each
    injected packet whose slow segment ends on this host; a decoy on another host."""
    out = [layout.encode({"ts_ns": 1, "probe_id": probe_id, "kind": kinds["VNET_KIND_SCHED"],
                          "runq_ns": 1, "pid": 1, "comm": b"discarded"})]  # marked discarded below
    if spec.inject_segment is None:
        return out
    end_hop = spec.inject_segment + 1
    if spec.host_of(end_hop) != h:
        return out
    for i in np.flatnonzero(truth.injected & (truth.times[:, end_hop] >= 0)).tolist():
        t = int(truth.times[i, end_hop]) + offset
        out.append(layout.encode({"ts_ns": t - 100, "probe_id": probe_id, "kind": kinds["VNET_KIND_SCHED"],
                                  "cpu": 1, "runq_ns": spec.extra_ns, "pid": 4242, "tgid": 4240,
                                  "comm": b"vhost-4240", "prev_pid": 777, "prev_comm": b"stress-ng"}))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--packets", type=int, default=100_000)
    ap.add_argument("--hooks", type=int, default=4)
    ap.add_argument("--hosts", type=int, choices=(1, 2), default=1)
    ap.add_argument("--delays-us", default="5,20,8", help="per segment, comma-separated")
    ap.add_argument("--jitter-ns", type=int, default=500)
    ap.add_argument("--inject-segment", type=int, default=1)
    ap.add_argument("--extra-us", type=float, default=200)
    ap.add_argument("--fraction", type=float, default=0.02)
    ap.add_argument("--drop-after", type=int, default=None)
    ap.add_argument("--drop-fraction", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    delays = [int(float(x) * 1000) for x in a.delays_us.split(",")]
    if len(delays) != a.hooks - 1:
        delays = (delays * a.hooks)[:a.hooks - 1]
    spec = Spec(packets=a.packets, hooks=a.hooks, hosts=a.hosts, delays_ns=delays, jitter_ns=a.jitter_ns,
                inject_segment=a.inject_segment, extra_ns=int(a.extra_us * 1000), inject_fraction=a.fraction,
                drop_after=a.drop_after, drop_fraction=a.drop_fraction if a.drop_after is not None else 0.0,
                seed=a.seed)
    paths, _ = write(spec, a.out)
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
