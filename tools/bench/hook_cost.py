#!/usr/bin/env python3
"""Per-hook cost: nanoseconds per run of each vnet program (issue 10, benchmark 4).

Three measurements, every program loaded by vnet's own trace loader (same
config, filter encoding and tcpdump splice as `vnet trace`):

 1. BPF_PROG_TEST_RUN with a repeat count (tc programs): the kernel's `duration`,
    the mean ns per run over the repeat count, for a packet that makes an event,
    one the field filter rejects (a plain IP packet: on its tuple, before the
    parse; one with an in-band VLAN tag: after it), one a tcpdump expression
    rejects (before parsing), and with --snaplen. Run-time statistics off.
 2. Context-only test runs (raw_tp programs: the kernel takes no repeat count
    and reports no duration) timed by the kernel's run-time statistics
    (bpf_prog_info run_time_ns / run_cnt). A test run cannot hand them a real
    sk_buff, so these are the no-packet paths; the same statistics calibrate
    themselves on the tc program (their two clock reads per run are included).
    Programs the kernel cannot test-run are listed with its answer.
 3. Attached for real: tc on both ends of a veth pair in throwaway namespaces and
    the packet tracepoints, drop and scheduler probes, with the run-time
    statistics on while a UDP flood crosses the pair (no socket listens: every
    datagram is a kfree_skb drop too; --flood ipv6: over IPv6, --flood both: every case
    under each, side by side); run_time_ns / run_cnt per program. Net of
    empty programs attached at the same hooks (tcx, raw tracepoints) in the same
    rounds: what the statistics and the hook's dispatch of a program cost there
    (an attached empty tc program costs ~10 ns more than a test-run one).

Cases run in alternating rounds (A B C ... then B C ... A, ...) and each is
reported as median and min-max over the rounds. With --compare-to REV the tc test
runs [1] and the attached runs [3] also load the objects committed at git
revision REV (bpf/build/ there: the same loader, config and filter encoding), as
cases of their own in the same rounds, and a last table gives new/REV per case. --compare-parse does the
same in [3] for kernel hooks parsing from one copy against reading each header (parse_cfg), and
--compare-direct for typed kernel hooks reading the packet in place against the copy. Run-time statistics are turned
on through BPF_ENABLE_STATS (an fd: off again when it closes, even if this is
killed), never left on. Needs root.

Usage: hook_cost.py [--rounds N] [--repeat N] [--live-rounds N] [--packets N] [--no-live] [--flood F] [--cases TEXT]
                   [--probes PROBE] [--jit-pad BYTES] [--compare-to REV]
                   [--compare-dir DIR | --compare-parse | --compare-direct]
       hook_cost.py --update-budget      (rewrite tests/insn_budget.json: tools/bench/insn_budget.py --update)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from vnet.binding import lib, prog_test_run, program_info, run_time_stats  # noqa: E402
from vnet.binding.libbpf import ffi  # noqa: E402
from vnet.binding.ringbatch import RingGroupReader  # noqa: E402
from vnet.errors import VnetError  # noqa: E402
from vnet.probes import catalog  # noqa: E402
from vnet.probes import resolve as resolver  # noqa: E402
from vnet.tcpdump.ebpf import ALU64, EXIT, JMP, MOV, Insn, encode  # noqa: E402
from vnet.trace.filters import PacketFilter  # noqa: E402
from vnet.trace.session import Plan, Trace  # noqa: E402

TARGET_EVENT_NS = 150   # issue 10: a hook that emits an event, p50
TARGET_REJECT_NS = 30   # a packet the filter rejects
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
RING_BYTES = 32 << 20
TC = "vnet_tc_ingress"



def udp_frame(payload: bytes) -> bytes:
    """Ethernet, IPv4, UDP 10.0.0.1:4000 -> 10.0.0.2:5000."""
    return (b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
            + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 1, 0x4000, 64, 17, 0, bytes([10, 0, 0, 1]),
                          bytes([10, 0, 0, 2]))
            + struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload)


FRAME = udp_frame(b"vnet-hook-cost-benchmark!!")  # 68 bytes: 26 of payload, hashed into the pkt_id
# the same with an 802.1Q tag in the bytes (no offload): not plain, the field filter parses it first
TAGGED_FRAME = FRAME[:12] + b"\x81\x00\x00\x0a" + FRAME[12:]


def _no_attach(_obj) -> list:
    return []


def committed_objects(rev: str, dest: Path) -> Path:
    """bpf/build/*.bpf.o as committed at git revision `rev`, into `dest`."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "bpf/build/"], check=True,
                           capture_output=True, text=True).stdout.split()
    if not names:
        raise SystemExit(f"--compare-to {rev}: no bpf/build/ objects committed there")
    for name in names:
        (dest / Path(name).name).write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"],
                                                            check=True, capture_output=True).stdout)
    return dest


@contextlib.contextmanager
def objects_from(objdir: Path | None):
    """Load vnet objects from `objdir` (VNET_BPF_DIR) in this block; None: this tree's."""
    before = os.environ.get("VNET_BPF_DIR")
    if objdir is not None:
        os.environ["VNET_BPF_DIR"] = str(objdir)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VNET_BPF_DIR", None)
        else:
            os.environ["VNET_BPF_DIR"] = before


OTHER: tuple[str, Path | None] | None = None  # --compare-to: (revision, its objects); --compare-parse: (label, None)
THIS_KW: dict = {}   # Trace keyword arguments of this tree's cases in [3] (--compare-parse)
JIT_PADS: list[int] = []  # --jit-pad: [3]'s cases once per value, an empty program that size loaded first
OTHER_KW: dict = {}  # ... and of the other cases


def stats_sysctl() -> str:
    try:
        return Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip()
    except OSError:
        return "?"


class Summary:
    """Samples per case in insertion order; median and min-max."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def add(self, case: str, value: float) -> None:
        self.samples.setdefault(case, []).append(value)

    def row(self, case: str) -> tuple[float, float, float]:
        v = self.samples[case]
        return statistics.median(v), min(v), max(v)


def rotations(cases: list, rounds: int):
    """Round r runs the cases starting at r mod len: A B C, B C A, C A B, ..."""
    for r in range(rounds):
        k = r % len(cases)
        yield r, cases[k:] + cases[:k]


def verdict(net: float, target: int | None) -> str:
    if target is None:
        return ""
    if net <= target:
        return f"<= {target}: met"
    return f"<= {target}: missed by {net - target:.1f} ns ({net / target:.1f}x)"


def table(title: str, summary: Summary, targets: dict[str, int | None], floors: dict[str, float] | None = None,
          notes: dict[str, str] | None = None) -> str:
    """Rows of median, min, max and net = median - the floor of that row's method
    (the same measurement of an empty program); the target is judged on net."""
    lines = [title, f"  {'case':<62} {'median':>7} {'min':>7} {'max':>7} {'net':>7}  target (on net)"]
    group = None
    for case in summary.samples:
        med, lo, hi = summary.row(case)
        name = case
        if " | " in case:  # 'group | row': the group once, as a heading
            heading, name = case.split(" | ", 1)
            if heading != group:
                group = heading
                lines.append(f"  {heading}:")
            name = "  " + name
        floor = (floors or {}).get(case)
        net = med - floor if floor is not None else None
        note = (notes or {}).get(case, "")
        lines.append(f"  {name:<62} {med:>7.1f} {lo:>7.1f} {hi:>7.1f} "
                     + (f"{net:>7.1f}  {verdict(net, targets.get(case))}" if net is not None else f"{'':>7}")
                     + (f"  {note}" if note else ""))
    return "\n".join(lines)


# -- programs ------------------------------------------------------------------------------------

def load_empty(prog_type: int, retval: int, times: int = 1) -> int:
    """`r0 = retval; exit`: the floor any program pays, as a raw fd. `times`: that many
    `r0 = retval` (4 bytes of x86 JIT code each), to take up room in the JIT's memory."""
    insns = encode([Insn(ALU64 | MOV, dst=0, imm=retval)] * times + [Insn(JMP | EXIT)])
    fd = lib().bpf_prog_load(prog_type, b"vnet_bench_nop", b"Dual BSD/GPL", ffi.from_buffer(insns), times + 1,
                             ffi.NULL)
    if fd < 0:
        raise VnetError(f"loading an empty program (type {prog_type}, {times + 1} instructions) failed: errno {-fd}")
    return fd


def tc_trace(**kw) -> Trace:
    plan = Plan("tc_trace", "tc_cfg", {"l3": 0}, (TC,), _no_attach, {}, name="dev:bench", filterable=True)
    trace = Trace([plan], ring_bytes=RING_BYTES, **kw)
    trace.start()
    return trace


def probe_trace(name: str, kind: str, **kw) -> Trace:
    res = resolver.resolve(catalog.BY_NAME[name], force=kind)
    if not res.available:
        raise VnetError(f"{name} has no {kind} hook here: {res.reason}")
    plan = dataclasses.replace(resolver.plan(res), attach=_no_attach)
    trace = Trace([plan], ring_bytes=RING_BYTES, **kw)
    trace.start()
    return trace


@dataclasses.dataclass
class TcCase:
    name: str
    expect: str          # "emitted" or "filtered": checked on the kernel's counters each run
    target: int | None
    kw: dict
    frame: bytes = FRAME
    objdir: Path | None = None  # --compare-to: the other revision's objects
    trace: Trace | None = None
    reader: RingGroupReader | None = None

    def open(self) -> None:
        with objects_from(self.objdir):
            self.trace = tc_trace(**self.kw)
        self.reader = self.trace.batch_reader()

    def run(self, repeat: int) -> int:
        before = self.trace.stats()
        res = self.trace.objects[0].programs[TC].test_run(self.frame, repeat=repeat)
        after = self.trace.stats()
        got = getattr(after, self.expect) - getattr(before, self.expect)
        if got != repeat or after.lost != before.lost:
            raise SystemExit(f"{self.name}: {got} {self.expect} of {repeat}, {after.lost - before.lost} lost")
        while self.reader.read().count:  # empty again, outside the timing
            pass
        return res.duration_ns


class ExpressionAlone(PacketFilter):
    """The control: a tcpdump expression with nothing derived to test first
    (vnet/tcpdump/prejudge.py), so that its own cost shows beside the criteria's."""

    def config(self, prejudge: bool = True, **kinds) -> dict:
        return super().config(prejudge=False)


TC_CASES = [
    TcCase("tc: no filter, event", "emitted", TARGET_EVENT_NS, {}),
    TcCase("tc: field filter --dport 5000 matches, event", "emitted", TARGET_EVENT_NS,
           {"packet_filter": PacketFilter(dport=5000)}),
    TcCase("tc: field filter --dport 53 rejects (plain: before parsing)", "filtered", TARGET_REJECT_NS,
           {"packet_filter": PacketFilter(dport=53)}),
    TcCase("tc: field filter --dport 53 rejects, UDP without payload", "filtered", TARGET_REJECT_NS,
           {"packet_filter": PacketFilter(dport=53)}, udp_frame(b"")),
    TcCase("tc: field filter --dport 53 rejects, VLAN tag in-band (after parsing)", "filtered", TARGET_REJECT_NS,
           {"packet_filter": PacketFilter(dport=53)}, TAGGED_FRAME),
    TcCase("tc: tcpdump 'udp and dst port 53' rejects (its criteria first: before parsing)", "filtered",
           TARGET_REJECT_NS, {"packet_filter": PacketFilter(expression="udp and dst port 53")}),
    TcCase("tc: tcpdump 'udp and dst port 53' rejects (the expression alone: nothing derived)",
           "filtered", TARGET_REJECT_NS, {"packet_filter": ExpressionAlone(expression="udp and dst port 53")}),
    TcCase("tc: tcpdump 'udp and dst port 5000' matches, event", "emitted", TARGET_EVENT_NS,
           {"packet_filter": PacketFilter(expression="udp and dst port 5000")}),
    TcCase("tc: tcpdump 'udp and dst port 5000' matches, event (the expression alone)", "emitted", TARGET_EVENT_NS,
           {"packet_filter": ExpressionAlone(expression="udp and dst port 5000")}),
    TcCase("tc: --snaplen 128, event + bytes", "emitted", TARGET_EVENT_NS, {"snaplen": 128}),
    TcCase("tc: tcpdump match + --snaplen 256, event + bytes", "emitted", TARGET_EVENT_NS,
           {"packet_filter": PacketFilter(expression="udp and dst port 5000"), "snaplen": 256}),
]


def other_label(name: str) -> str:
    return f"{name} [{OTHER[0]}]"


def bench_test_runs(rounds: int, repeat: int) -> tuple[str, Summary, float]:
    summary = Summary()
    floor_fd = load_empty(BPF_PROG_TYPE_SCHED_CLS, -1)
    floor = "empty SCHED_CLS program (r0 = -1; exit): the harness floor"
    tc_cases = list(TC_CASES)
    if OTHER and OTHER[1] is not None:  # (tc programs have no parse_cfg: --compare-parse leaves [1] alone)
        tc_cases += [dataclasses.replace(c, name=other_label(c.name), objdir=OTHER[1]) for c in TC_CASES]
    try:
        for case in tc_cases:
            case.open()
        cases = [floor] + tc_cases
        for case in tc_cases:  # warm caches and the ring's pages once
            case.run(repeat)
        for _, order in rotations(cases, rounds):
            for case in order:
                if case is floor:
                    summary.add(floor, prog_test_run(floor_fd, FRAME, repeat=repeat).duration_ns)
                else:
                    summary.add(case.name, case.run(repeat))
    finally:
        os.close(floor_fd)
        for case in tc_cases:
            if case.trace is not None:
                case.trace.close()
    title = (f"[1] BPF_PROG_TEST_RUN, {len(FRAME)}-byte UDP frame (unless said), repeat {repeat}: the kernel's "
             f"`duration`, ns per run ({rounds} alternating rounds; kernel.bpf_stats_enabled={stats_sysctl()}); "
             f"net = median - the empty program's")
    floor_ns = summary.row(floor)[0]
    return (table(title, summary, {c.name: c.target for c in tc_cases}, {c.name: floor_ns for c in tc_cases}),
            summary, floor_ns)


# -- context-only runs, timed by run-time statistics ----------------------------------------------

CTX = bytes(8 * 6)  # six zero u64 arguments: no sk_buff, no task, no device


def _stats_ns(fd: int, run) -> tuple[float, int]:
    before = program_info(fd)
    run()
    after = program_info(fd)
    n = after.run_cnt - before.run_cnt
    return (after.run_time_ns - before.run_time_ns) / max(n, 1), n


def bench_stats_runs(rounds: int, calls: int, repeat: int) -> tuple[str, dict[str, float]]:
    summary = Summary()
    traces: list[Trace] = []
    fds: list[int] = []
    try:
        raw_floor = load_empty(BPF_PROG_TYPE_RAW_TRACEPOINT, 0)
        tc_floor = load_empty(BPF_PROG_TYPE_SCHED_CLS, -1)
        fds += [raw_floor, tc_floor]
        skb = probe_trace("net:netif_receive_skb", "raw_tp")
        task = probe_trace("sock:consume_skb", "raw_tp")
        drop = probe_trace("drop:kfree_skb", "raw_tp")
        tc = tc_trace()
        traces += [skb, task, drop, tc]

        def ctx_runs(fd: int):
            return lambda: [prog_test_run(fd, None, ctx=CTX) for _ in range(calls)]

        def prog_fd(trace: Trace) -> int:
            obj = trace.objects[0]
            return next(p.fd for p in obj.programs.values() if p.autoload)

        tc_fd = prog_fd(tc)
        durations: list[float] = []

        def tc_run():
            durations.append(prog_test_run(tc_fd, FRAME, repeat=repeat).duration_ns)

        floor_raw = "empty raw_tp program: the floor (two clock reads)"
        floor_tc = "empty SCHED_CLS program, repeat: the floor"
        cases = [
            (floor_raw, raw_floor, ctx_runs(raw_floor)),
            ("skb_trace raw_tp, no sk_buff (a call probe): event", prog_fd(skb), ctx_runs(prog_fd(skb))),
            ("skb_trace raw_tp + task (pid, comm), no sk_buff: event", prog_fd(task), ctx_runs(prog_fd(task))),
            ("drop raw_tp, no sk_buff: event with reason, pid, comm", prog_fd(drop), ctx_runs(prog_fd(drop))),
            (floor_tc, tc_floor, lambda: prog_test_run(tc_floor, FRAME, repeat=repeat)),
            ("tc: no filter, event, repeat", tc_fd, tc_run),
        ]
        readers = [t.batch_reader() for t in traces]
        with run_time_stats():
            for _, order in rotations(cases, rounds):
                for name, fd, run in order:
                    ns, n = _stats_ns(fd, run)
                    if not n:
                        raise SystemExit(f"{name}: no run counted (run-time statistics off?)")
                    summary.add(name, ns)
                    for r in readers:
                        while r.read().count:
                            pass
        own = "tc: the same runs' own test-run `duration` (stats on)"
        summary.samples[own] = durations
        for r in readers:
            r.close()
    finally:
        for fd in fds:
            os.close(fd)
        for t in traces:
            t.close()
    floors = {"raw_tp": summary.row(floor_raw)[0], "tc": summary.row(floor_tc)[0]}
    by_case = {name: floors["tc" if "tc:" in name else "raw_tp"] for name, _, _ in cases if "floor" not in name}
    title = (f"[2] run-time statistics on (bpf_prog_info run_time_ns / run_cnt), ns per run: raw_tp context-only "
             f"test runs ({calls} per round), tc with repeat {repeat} ({rounds} alternating rounds); net = median - "
             f"the empty program's of the same type")
    return table(title, summary, {}, by_case) + "\n" + cannot_test_run(), floors


def cannot_test_run() -> str:
    """What this kernel answers to a test run of each other program (or to loading it)."""
    lines = ["  not test-runnable here (the kernel's answer):"]
    checks = [("skb_trace", "net:netif_receive_skb", "tp_btf"), ("skb_trace", "net:netif_receive_skb", "tracepoint"),
              ("skb_trace", "veth:xmit", "fentry"), ("skb_trace", "veth:xmit", "kprobe"),
              ("drop", "drop:kfree_skb", "tp_btf"), ("sched", "sched:runq", "tp_btf")]
    for obj, probe, kind in checks:
        spec = catalog.BY_NAME[probe]
        res = resolver.resolve(spec, force=kind)
        if not res.available:
            res = resolver.Resolution(spec, next(h for h in spec.hooks if h.kind == kind))
        plan = dataclasses.replace(resolver.plan(res), attach=_no_attach)
        what = f"{obj} {', '.join(plan.programs)} ({kind})"
        try:
            trace = Trace([plan], ring_bytes=1 << 20)
            trace.start()
        except VnetError as e:
            lines.append(f"    {what}: does not load: {str(e).splitlines()[0][:110]}")
            continue
        try:
            prog = trace.objects[0].programs[plan.programs[-1]]
            try:
                prog.test_run(None, ctx=CTX)
                lines.append(f"    {what}: a test run works: measure it like the raw_tp programs")
            except VnetError as e:
                lines.append(f"    {what}: test run refused: {str(e).split(': ', 1)[-1][:90]}")
        finally:
            trace.close()
    lines.append("    (tp_btf and raw_tp twins share one body; tracepoint/kprobe/fentry run only attached: [3])")
    return "\n".join(lines)


# -- attached for real -----------------------------------------------------------------------------

LIVE_PROBES = ["net:net_dev_queue", "net:net_dev_start_xmit", "net:net_dev_xmit", "net:netif_rx",
               "net:netif_receive_skb", "drop:kfree_skb", "sock:consume_skb", "sched:runq"]
MIN_LIVE_RUNS = 100


def rejects_both_ways(expression: str, derived: str) -> list:
    """A tcpdump expression's rejects with the criteria vnet derives (`derived`, in words) and without."""
    return [(f"tcpdump '{expression}' rejects (its criteria first: {derived})",
             {"packet_filter": PacketFilter(expression=expression)}),
            (f"tcpdump '{expression}' rejects (the expression alone: nothing derived)",
             {"packet_filter": ExpressionAlone(expression=expression)})]


LIVE_VARIANTS = [
    ("no filter: events", {}),
    ("field filter --dport 9 rejects (plain: before parsing)", {"packet_filter": PacketFilter(dport=9)}),
    ("tcpdump 'udp and dst port 9' rejects (its criteria first: before parsing)",
     {"packet_filter": PacketFilter(expression="udp and dst port 9")}),
    ("tcpdump 'udp and dst port 9' rejects (the expression alone: nothing derived)",
     {"packet_filter": ExpressionAlone(expression="udp and dst port 9")}),
    ("tcpdump 'udp and dst port 5000' keeps: events (its criteria first, then the expression)",
     {"packet_filter": PacketFilter(expression="udp and dst port 5000")}),
    ("tcpdump 'udp and dst port 5000' keeps: events (the expression alone)",
     {"packet_filter": ExpressionAlone(expression="udp and dst port 5000")}),
    *rejects_both_ways("tcp port 80 or tcp port 443", "protocol tcp, port 80 or 443"),
    *rejects_both_ways("port 80 or port 443", "port 80 or 443"),
    *rejects_both_ways("tcp or icmp", "protocol tcp or icmp"),
    *rejects_both_ways("host 192.0.2.1 or host 198.51.100.1", "IPv4, host 192.0.2.1 or 198.51.100.1"),
    *rejects_both_ways("host 192.0.2.1 or host 2001:db8::1", "host 192.0.2.1, or 2001:db8::1 for IPv6"),
    *rejects_both_ways("ip6 host 2001:db8::1 or ip6 host 2001:db8::2", "IPv6, host 2001:db8::1 or ::2"),
    *rejects_both_ways("port 53", "port 53, SCTP left to the expression"),
    *rejects_both_ways("not port 22 and not port 5000", "no TCP or UDP port 22 or 5000"),
    *rejects_both_ways("not host 10.199.211.2", "no IPv4 source or destination 10.199.211.2 (the flood's receiver)"),
    *rejects_both_ways("net 192.0.2.0/24 or net 198.51.100.0/24", "IPv4, source or destination in either prefix"),
    *rejects_both_ways("not net 10.199.0.0/16", "no IPv4 source or destination in 10.199.0.0/16 (the flood's)"),
    *rejects_both_ways("arp", "no plain IP packet"),
    ("--snaplen 128: events + bytes", {"snaplen": 128}),
]


FLOOR_VARIANT = "empty programs at the same hooks (r0 = return; exit): the floor attached"
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47


def raw_tracepoint_open(name: str, prog_fd: int) -> int:
    """BPF_RAW_TRACEPOINT_OPEN for a raw fd (the binding attaches only its objects' programs)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    tp = ctypes.create_string_buffer(name.encode())
    attr = ctypes.create_string_buffer(struct.pack("=QI4x", ctypes.addressof(tp), prog_fd), 128)
    fd = libc.syscall(SYS_BPF, BPF_RAW_TRACEPOINT_OPEN, attr, 128)
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"attaching an empty raw_tp program to {name}")
    return fd


def hook_of(label: str) -> str:
    """The hook a [3] label names, whatever the program kind: 'veth A (sender) tc egress',
    'net:netif_receive_skb (tp_btf)' -> 'net:netif_receive_skb'."""
    return label if " tc " in label else label.split(" (")[0]


@contextlib.contextmanager
def empty_at_hooks(pair, names: dict[str, str]):
    """Empty programs at the hooks [3] traces, attached as vnet attaches (tcx links, raw
    tracepoints: the dispatch tp_btf takes too): {label: prog fd}. What a program there pays
    before it does anything, under the same flood and statistics: the floor of [3]'s rows.
    Nothing where tcx is missing (the [2] floor stands in)."""
    from vnet import netns

    fds: list[int] = []
    progs: dict[str, int] = {}
    try:
        for ns, ifname, dev in ((pair.ns1, pair.if1, f"dev:{pair.ns1}/{pair.if1}"),
                                (pair.ns2, pair.if2, f"dev:{pair.ns2}/{pair.if2}")):
            for direction, attach_type in (("ingress", BPF_TCX_INGRESS), ("egress", BPF_TCX_EGRESS)):
                fd = load_empty(BPF_PROG_TYPE_SCHED_CLS, -1)
                fds.append(fd)
                with netns.enter(ns):
                    link = lib().bpf_link_create(fd, socket.if_nametoindex(ifname), attach_type, ffi.NULL)
                if link < 0:
                    raise OSError(-link, "no tcx link for an empty program")
                fds.append(link)
                progs[f"{names[dev]} tc {direction}"] = fd
        for probe in LIVE_PROBES:
            if probe.startswith("sched:"):
                continue  # not on the flood's path
            fd = load_empty(BPF_PROG_TYPE_RAW_TRACEPOINT, 0)
            fds.append(fd)
            fds.append(raw_tracepoint_open(probe.split(":")[1], fd))
            progs[f"{probe} (raw_tp)"] = fd
        yield progs
    finally:
        for fd in reversed(fds):
            os.close(fd)


@contextlib.contextmanager
def draining(trace: Trace):
    """A thread reads the trace's rings in batches while the block runs: no event is
    lost to a full ring, and the reader's work runs beside the programs, as a trace's."""
    reader = trace.batch_reader()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            reader.wait(20)
            while reader.read().count:
                pass

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        reader.close()


IPV6_FLOOD = ("fd00:211::1", "fd00:211::2")  # --flood ipv6: the flood's addresses
V6_SUFFIX = " [IPv6 flood]"  # --flood both: the cases under the IPv6 flood
FLOOD_WORDS = {"ipv4": "", "ipv6": "/IPv6", "both": "/IPv4 and UDP/IPv6"}


def bench_live(rounds: int, packets: int, floors: dict[str, float], size: int = 10,
               floods: str = "ipv4") -> tuple[str, Summary, dict[str, float]]:
    from vnet.topology import send_udp, veth_pair, warm_up
    from vnet.trace.selection import select

    summary = Summary()
    counts: dict[str, list[int]] = {}
    lost = 0
    cases = LIVE_VARIANTS + ([(variant + V6_SUFFIX, kw) for variant, kw in LIVE_VARIANTS] if floods == "both" else [])
    # (label, Trace keyword arguments, objects, bytes of JIT pad)
    variants = [(variant, {**kw, **THIS_KW}, None, 0) for variant, kw in cases]
    if JIT_PADS:  # the same cases with every program placed elsewhere in the JIT's memory
        variants = [(f"{variant} [JIT pad {pad}]", kw, objdir, pad)
                    for variant, kw, objdir, _ in variants for pad in JIT_PADS]
    if OTHER:
        variants += [(other_label(variant), {**kw, **OTHER_KW}, OTHER[1], 0) for variant, kw in cases]
    variants.append((FLOOR_VARIANT, {}, None, 0))

    def flood(variant: str, progs: dict[str, int]) -> None:
        """The round's flood, and each program's runs and ns per run in it."""
        before = {k: program_info(fd) for k, fd in progs.items()}
        # send_udp's own payloads ("vnet-%06d"), padded to `size`
        dst = ip6 if floods == "ipv6" or V6_SUFFIX in variant else pair.ip2
        send_udp(pair.ns1, dst, 5000, count=packets, payload_fn=lambda i: (b"vnet-%06d" % i).ljust(size, b"x"))
        time.sleep(0.05)  # the last datagrams cross the pair
        after = {k: program_info(fd) for k, fd in progs.items()}
        for label in progs:
            n = after[label].run_cnt - before[label].run_cnt
            key = f"{variant} | {label}"
            counts.setdefault(key, []).append(n)
            if n:
                summary.add(key, (after[label].run_time_ns - before[label].run_time_ns) / n)

    with veth_pair(211) as pair, run_time_stats():
        ip6 = IPV6_FLOOD[1]
        if floods != "ipv4":
            for (ifname, ns), addr in zip(((pair.if1, pair.ns1), (pair.if2, pair.ns2)), IPV6_FLOOD):
                pair.topo.add_address(ifname, ns, f"{addr}/64")
            warm_up(pair.ns1, ip6)
            warm_up(pair.ns2, IPV6_FLOOD[0])
        names = {f"dev:{pair.ns1}/{pair.if1}": "veth A (sender)", f"dev:{pair.ns2}/{pair.if2}": "veth B (receiver)"}
        for _, order in rotations(variants, rounds):
            for variant, kw, objdir, pad in order:
                if variant == FLOOR_VARIANT:
                    try:
                        with empty_at_hooks(pair, names) as progs:
                            flood(variant, progs)
                    except OSError as e:
                        print(f"  (no floor attached: {e}; [2]'s stands in)", flush=True)
                        variants.remove((FLOOR_VARIANT, {}, None, 0))
                    continue
                # sched:runq watches pid 1 (idle): the path of the threads it does not watch, which
                # is what nearly every context switch of a traced host takes.
                plans, _ = select([f"{pair.ns1}/{pair.if1}", f"{pair.ns2}/{pair.if2}"], LIVE_PROBES, pids=(1,))
                trace = Trace(plans, ring_bytes=RING_BYTES, strict=False, **kw)
                # loaded before the trace's programs, so that they land after it; once they are
                # loaded their place is fixed
                pad_fd = load_empty(BPF_PROG_TYPE_SCHED_CLS, 0, max(1, pad // 4)) if pad > 0 else None
                try:
                    with objects_from(objdir):
                        trace.start()
                finally:
                    if pad_fd is not None:
                        os.close(pad_fd)
                with contextlib.closing(trace):
                    kinds = {h.probe: h.kind for h in trace.hooks}
                    progs = {}
                    loaded = iter(trace.objects)
                    skipped = dict(trace.skipped)
                    for plan in trace.plans:
                        if plan.name in skipped:
                            continue
                        obj = next(loaded)
                        for name in plan.programs:
                            if plan.obj == "tc_trace":
                                direction = name.removeprefix("vnet_tc_")
                                label = f"{names.get(plan.name, plan.name)} tc {direction}"
                            else:
                                label = f"{plan.name} ({kinds.get(plan.name, '?')}" + (
                                    f" {name.removeprefix('vnet_tp_btf_').removeprefix('vnet_raw_tp_')})"
                                    if plan.obj == "sched" else ")")
                            progs[label] = obj.programs[name].fd
                    with draining(trace):
                        flood(variant, progs)
                    lost += trace.stats().lost
    targets, notes, by_case = {}, {}, {}
    busy = {key.split(" | ")[1] for key in counts if statistics.median(counts[key]) >= MIN_LIVE_RUNS}
    few = sorted({key.split(" | ")[1] for key in counts if not key.startswith(FLOOR_VARIANT)} - busy)
    attached_floor = {hook_of(key.split(" | ")[1]): statistics.median(v) for key, v in summary.samples.items()
                      if key.startswith(FLOOR_VARIANT + " | ") and statistics.median(counts[key]) >= MIN_LIVE_RUNS}
    for key in list(summary.samples):
        variant, label = key.split(" | ")
        runs = statistics.median(counts[key])
        if runs < MIN_LIVE_RUNS:
            del summary.samples[key]
            continue
        notes[key] = f"runs/round {runs:.0f}"
        if variant == FLOOR_VARIANT:
            continue
        floor = attached_floor.get(hook_of(label))
        if floor is None:
            floor = floors["tc" if " tc " in label else "raw_tp"]
            notes[key] += ", floor from [2]"
        by_case[key] = floor
        if runs >= packets / 2 and "sched" not in label:  # a hook on the flood's path
            targets[key] = TARGET_REJECT_NS if "rejects" in variant else TARGET_EVENT_NS
    ordered = Summary()
    for variant, *_ in variants:
        for key, v in summary.samples.items():
            if key.startswith(variant + " | "):
                ordered.samples[key] = v
    title = (f"[3] attached, run-time statistics on, UDP{FLOOD_WORDS[floods]} flood of {packets} datagrams "
             f"A -> B:5000 ({size}-byte "
             f"payloads; no socket: each "
             f"one is dropped too), ns per run, {rounds} alternating rounds; net = median - the empty program's at "
             f"the same hook in the same rounds (the last rows; where none ran, [2]'s test-run floor: "
             f"tc {floors['tc']:.1f}, tracing {floors['raw_tp']:.1f}); events lost: {lost}; attached: the two "
             f"devices' tc programs, {', '.join(LIVE_PROBES)}")
    return (table(title, ordered, targets, by_case, notes)
            + f"\n  left out, under {MIN_LIVE_RUNS} runs per round in every variant (not on the flood's path): "
            f"{', '.join(few)}", ordered, by_case)


def comparison(test_runs: tuple[Summary, float], live: tuple[Summary, dict[str, float]] | None) -> str:
    """new / --compare-to revision, per case present in both, on net (median - floor)."""
    lines = [f"[4] this tree / {OTHER[0]}, net ns (median - floor) of the same rounds above",
             f"  {'case':<90} {'this':>7} {OTHER[0][:9]:>9} {'ratio':>6}"]
    summary, floor = test_runs
    rows = [(name, summary.row(name)[0] - floor, summary.row(other_label(name))[0] - floor)
            for name in summary.samples if other_label(name) in summary.samples]
    if live is not None:
        lsum, floors = live
        for key in lsum.samples:
            variant, label = key.split(" | ", 1)
            okey = f"{other_label(variant)} | {label}"
            if okey in lsum.samples:
                rows.append((f"{variant} | {label}", lsum.row(key)[0] - floors[key], lsum.row(okey)[0] - floors[okey]))
    for name, new, old in rows:
        lines.append(f"  {name:<90} {new:>7.1f} {old:>9.1f} {new / old if old > 0 else float('nan'):>6.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9, help="alternating rounds of [1] and [2] (default 9)")
    ap.add_argument("--repeat", type=int, default=20000, help="test-run repeat count (default 20000)")
    ap.add_argument("--calls", type=int, default=5000, help="context-only runs per case per round in [2]")
    ap.add_argument("--live-rounds", type=int, default=5, help="alternating rounds of [3] (default 5)")
    ap.add_argument("--packets", type=int, default=20000, help="datagrams per round in [3] (default 20000)")
    ap.add_argument("--no-live", action="store_true", help="skip [3] (no namespaces, no traffic)")
    ap.add_argument("--flood", choices=tuple(FLOOD_WORDS), default="ipv4",
                    help="[3]'s flood over IPv4 (default), IPv6 (fd00:211::1 -> ::2), or both: each case "
                         "under each in the same rounds")
    ap.add_argument("--size", type=int, default=10,
                    help="UDP payload bytes of [3]'s flood (default 10; e.g. 1400: the whole datagram in the linear part)")
    ap.add_argument("--cases", metavar="TEXT", action="append",
                    help="only the [1] and [3] cases whose name has TEXT (repeatable; the floors always run)")
    ap.add_argument("--probes", metavar="PROBE", action="append",
                    help="[3]'s kernel probes beside the two devices' tc programs (repeatable; default every one "
                         "of " + ", ".join(LIVE_PROBES) + "): e.g. one alone, to tell its own cost from the "
                         "other programs' beside it")
    ap.add_argument("--jit-pad", metavar="BYTES", type=int, action="append",
                    help="[3]'s cases once per value (repeatable), in the same rounds, each with an empty program "
                         "of about BYTES of JIT code loaded first: its programs land elsewhere in the kernel's JIT "
                         "memory (what placement alone does; 0: none)")
    ap.add_argument("--update-budget", action="store_true",
                    help="only rewrite tests/insn_budget.json (tools/bench/insn_budget.py --update)")
    ap.add_argument("--compare-to", metavar="REV",
                    help="also load the objects committed at git revision REV, as cases of their own in the same "
                         "rounds of [1] and [3], and print this tree / REV per case")
    ap.add_argument("--compare-parse", action="store_true",
                    help="kernel hooks parsing from one copy (parse_cfg.copy) against reading each header, as "
                         "cases of their own in the same rounds of [3], whatever features says of this kernel")
    ap.add_argument("--compare-dir", metavar="DIR",
                    help="as --compare-to, with the objects in DIR (a scratch build of a variant)")
    ap.add_argument("--compare-direct", action="store_true",
                    help="typed kernel hooks reading the packet in place (parse_cfg.direct) against parsing from "
                         "one copy, as cases of their own in the same rounds of [3], whatever features says")
    args = ap.parse_args()
    if sum(map(bool, (args.compare_to, args.compare_dir, args.compare_parse, args.compare_direct))) > 1:
        sys.exit("--compare-to, --compare-dir, --compare-parse, --compare-direct: one comparison at a time")
    if os.geteuid() != 0:
        sys.exit("needs root (loads eBPF, creates namespaces)")
    if args.update_budget:
        sys.argv = [sys.argv[0], "--update"]
        sys.path.insert(0, str(Path(__file__).parent))
        import insn_budget
        insn_budget.main()
        return
    global OTHER
    if args.probes:
        unknown = sorted(set(args.probes) - set(LIVE_PROBES))
        if unknown:
            sys.exit(f"--probes {unknown[0]}: not one of [3]'s probes ({', '.join(LIVE_PROBES)})")
        LIVE_PROBES[:] = [p for p in LIVE_PROBES if p in args.probes]
    if args.cases:
        TC_CASES[:] = [c for c in TC_CASES if any(t in c.name for t in args.cases)]
        LIVE_VARIANTS[:] = [v for v in LIVE_VARIANTS if any(t in v[0] for t in args.cases)]
        if not TC_CASES and not LIVE_VARIANTS:
            sys.exit(f"--cases {args.cases}: no case has that in its name")
    if args.jit_pad:
        JIT_PADS[:] = list(dict.fromkeys(max(0, b) for b in args.jit_pad))
    with tempfile.TemporaryDirectory(prefix="vnet-hook-cost-") as tmp:
        if args.compare_to:
            OTHER = (args.compare_to, committed_objects(args.compare_to, Path(tmp)))
        elif args.compare_dir:
            OTHER = (Path(args.compare_dir).name, Path(args.compare_dir).resolve())
        elif args.compare_parse:
            OTHER = ("header reads", None)
            THIS_KW.update(parse_copy=True, parse_direct=False)
            OTHER_KW.update(parse_copy=False)
        elif args.compare_direct:
            OTHER = ("the copy", None)
            THIS_KW.update(parse_copy=True, parse_direct=True)
            OTHER_KW.update(parse_copy=True, parse_direct=False)
        print(f"hook_cost.py {datetime.date.today()} kernel {platform.release()} {os.cpu_count()} CPUs "
              f"(targets: event <= {TARGET_EVENT_NS} ns p50, rejected <= {TARGET_REJECT_NS} ns)"
              + (f"; compared with the objects of {args.compare_to}" if args.compare_to else "")
              + (f"; compared with the objects in {args.compare_dir}" if args.compare_dir else "")
              + ("; kernel hooks parsing from one copy compared with reading each header ([3])"
                 if args.compare_parse else "")
              + ("; typed kernel hooks reading the packet in place compared with parsing from one copy ([3])"
                 if args.compare_direct else "")
              + (f"; [3]'s cases once per JIT pad ({', '.join(map(str, JIT_PADS))} bytes)" if JIT_PADS else ""))
        text, *test_runs = bench_test_runs(args.rounds, args.repeat)
        print(text, flush=True)
        text, floors = bench_stats_runs(args.rounds, args.calls, args.repeat)
        print(text, flush=True)
        live = None
        if not args.no_live:
            text, *live = bench_live(args.live_rounds, args.packets, floors, args.size, args.flood)
            print(text, flush=True)
        if OTHER:
            print(comparison(test_runs, live), flush=True)


if __name__ == "__main__":
    main()
