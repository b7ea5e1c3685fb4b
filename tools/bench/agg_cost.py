#!/usr/bin/env python3
"""What `vnet trace --aggregate` costs per hook in the kernel when every packet is new
(issue 10), for this tree's objects against another revision's, in one run.

Two instances of the tc program stand for two hooks of a path (probe 0, then probe 1,
as two traced devices), loaded with aggregation on (no events), sharing their maps as
`vnet trace` shares them. Each round feeds them packets no round has sent before (a
distinct IP ID and source port each: a new pkt_id) by BPF_PROG_TEST_RUN, one run per
packet and hook, on one CPU:

  hop 1  the packet is new: counted at its point and noted in the per-packet table
  hop 2  found there: the time since hop 1 goes into the segment's histogram
  (--events: the same programs emitting an event per hop instead, the ring emptied
  between rounds: what aggregation is to be cheaper than)

The time is the kernel's run-time statistics (bpf_prog_info run_time_ns / run_cnt, on
through a BPF_ENABLE_STATS fd), so the test run's own syscall and sk_buff set-up are not
in it; "net" subtracts an empty SCHED_CLS program measured the same way. A warm-up
fills the per-packet table first (the LRU hash of older objects evicts on every insert
once full, as on a busy host). Rounds alternate the object sets; median (min-max).

    sudo .venv/bin/python tools/bench/agg_cost.py --compare-to a81de7f
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from vnet.binding import BpfObject  # noqa: E402
from vnet.binding.libbpf import ffi, lib  # noqa: E402
from vnet.binding import prog_test_run, program_info, run_time_stats  # noqa: E402

PROG = "vnet_tc_ingress"
SHARED = ("vnet_events", "vnet_stats", "vnet_agg_points", "vnet_agg_last", "vnet_agg_hist")
BPF_PROG_TYPE_SCHED_CLS = 3


class Packets:
    """Distinct UDP frames, never the same pkt_id twice in a run."""

    def __init__(self) -> None:
        self.n = 0

    def take(self, count: int) -> list[bytes]:
        out = []
        for _ in range(count):
            i = self.n
            self.n += 1
            payload = b"agg-cost" + struct.pack("!I", i)
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), i & 0xFFFF, 0x4000, 64, 17, 0,
                             bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
            udp = struct.pack("!HHHH", 1024 + (i >> 16) % 60000, 5000, 8 + len(payload), 0) + payload
            out.append(b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + ip + udp)
        return out


class Path2:
    """Two tc_trace instances of one object set, aggregation on (or events), maps shared."""

    def __init__(self, objdir: Path, aggregate: bool = True) -> None:
        self.objs: list[BpfObject] = []
        self.reader = None
        for probe_id in (0, 1):
            obj = BpfObject(objdir / "tc_trace.bpf.o")
            fields = {f.name for f in obj.config_layout("tc_cfg").fields}
            on = obj.btf.enum("vnet_agg")["VNET_AGG_ON"]
            config = {"probe_id": probe_id, "aggregate": on if aggregate else 0, "wakeup_every": 64,
                      "wakeup_bytes": 1 << 20}
            obj.set_config("tc_cfg", {k: v for k, v in config.items() if k in fields})
            obj.keep_programs([PROG])
            if self.objs:
                for name in SHARED:
                    obj.maps[name].share(self.objs[0].maps[name])
            else:
                obj.maps["vnet_events"].max_entries = 32 << 20
            obj.load()
            self.objs.append(obj)
        self.fds = [o.programs[PROG].fd for o in self.objs]
        if not aggregate:
            from vnet.binding.ringbatch import RingBatchReader

            self.reader = RingBatchReader(self.objs[0].maps["vnet_events"])

    def drain(self) -> None:
        """Events mode: empty the ring (outside the timed runs)."""
        while self.reader is not None and self.reader.read().count:
            pass

    def feed(self, frames: list[bytes]) -> None:
        p0, p1 = (o.programs[PROG] for o in self.objs)
        for f in frames:
            p0.test_run(f)
            p1.test_run(f)

    def close(self) -> None:
        for o in reversed(self.objs):
            o.close()


def stats(fd: int) -> tuple[int, int]:
    i = program_info(fd)
    return i.run_time_ns, i.run_cnt


def committed_objects(rev: str, dest: Path) -> Path:
    dest.mkdir()
    for name in subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "bpf/build/"], check=True,
                               capture_output=True, text=True).stdout.split():
        (dest / Path(name).name).write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"],
                                                            check=True, capture_output=True).stdout)
    return dest


def empty_tc() -> int:
    from vnet.tcpdump.ebpf import ALU64, EXIT, JMP, MOV, Insn, encode

    insns = encode([Insn(ALU64 | MOV, dst=0, imm=-1), Insn(JMP | EXIT)])
    fd = lib().bpf_prog_load(BPF_PROG_TYPE_SCHED_CLS, b"vnet_bench_nop", b"Dual BSD/GPL", ffi.from_buffer(insns), 2,
                             ffi.NULL)
    if fd < 0:
        raise SystemExit(f"loading an empty program failed: errno {-fd}")
    return fd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--packets", type=int, default=20000, help="new packets per case and round")
    ap.add_argument("--warm-up", type=int, default=70000, help="packets first, to fill the per-packet table")
    ap.add_argument("--compare-to", metavar="REV", help="also the objects committed at REV")
    ap.add_argument("--events", action="store_true", help="also each object set emitting events instead "
                    "(what --aggregate is to be cheaper than)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("agg_cost.py needs root")
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    packets = Packets()
    with tempfile.TemporaryDirectory(prefix="vnet-agg-cost-") as tmp:
        cases = {"this tree": ROOT / "bpf" / "build"}
        if args.compare_to:
            cases[args.compare_to] = committed_objects(args.compare_to, Path(tmp) / "rev")
        paths = {name: Path2(d) for name, d in cases.items()}
        if args.events:
            paths.update({f"{name}, events": Path2(d, aggregate=False) for name, d in cases.items()})
        floor_fd = empty_tc()
        floor_frame = packets.take(1)[0]
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        floors: list[float] = []
        try:
            for p in paths.values():
                for _ in range(0, args.warm_up, 10000):
                    p.feed(packets.take(10000))
                    p.drain()
            with run_time_stats():
                names = list(paths)
                for rnd in range(args.rounds):
                    order = names[rnd % len(names):] + names[:rnd % len(names)]
                    for name in order:
                        p = paths[name]
                        before = [stats(fd) for fd in p.fds]
                        p.feed(packets.take(args.packets))
                        after = [stats(fd) for fd in p.fds]
                        p.drain()
                        ns = [(a[0] - b[0]) / max(1, a[1] - b[1]) for a, b in zip(after, before)]
                        results[name].append((ns[0], ns[1]))
                        print(f"round {rnd + 1} {name:>19}: hop 1 {ns[0]:6.1f} ns, hop 2 {ns[1]:6.1f} ns", flush=True)
                    b = stats(floor_fd)
                    for _ in range(args.packets):
                        prog_test_run(floor_fd, floor_frame)
                    a = stats(floor_fd)
                    floors.append((a[0] - b[0]) / max(1, a[1] - b[1]))
        finally:
            for p in paths.values():
                p.close()
            os.close(floor_fd)
    floor = statistics.median(floors)
    print(f"\nagg_cost.py kernel {os.uname().release}, {args.rounds} rounds x {args.packets} new packets, CPU {cpu}; "
          f"empty tc program (floor): {floor:.1f} ns")

    def fmt(v):
        return f"{statistics.median(v):6.1f} ({min(v):.1f}-{max(v):.1f})"

    print(f"{'objects':>19} | {'hop 1 (new packet) ns':>24} | {'hop 2 (paired) ns':>24} | net hop 1 | net hop 2")
    med = {}
    for name, rs in results.items():
        h1, h2 = [r[0] for r in rs], [r[1] for r in rs]
        med[name] = (statistics.median(h1) - floor, statistics.median(h2) - floor)
        print(f"{name:>19} | {fmt(h1):>24} | {fmt(h2):>24} | {med[name][0]:9.1f} | {med[name][1]:9.1f}")
    if args.compare_to:
        a, b = med["this tree"], med[args.compare_to]
        print(f"this tree / {args.compare_to}, net: hop 1 {a[0] / b[0]:.2f}x, hop 2 {a[1] / b[1]:.2f}x")


if __name__ == "__main__":
    main()
