"""`vnet trace`: one-shot tracing of devices, printed as text or JSON Lines."""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional

from vnet.errors import NoSuchInterfaceError, UsageError
from vnet.probes import device as devprobe
from vnet.probes.catalog import PID_LIMIT
from vnet.trace import Trace
from vnet.trace.filters import PacketFilter
from vnet.trace.selection import select
from vnet.trace.records import format_json, format_text
from vnet.trace.session import (DEFAULT_RING_BYTES, DEFAULT_WAKEUP_EVERY, SNAP_MAX, check_ring_size, check_snaplen,
                                ring_count)

from .common import cli_errors, setup_logging
from .params import Argument, Option

log = logging.getLogger("vnet.trace")

VANISH_CHECK_S = 1.0   # how often the traced interfaces are looked for


class _Stop:
    """Set by SIGINT/SIGTERM; the loop notices within one poll interval."""

    def __init__(self):
        self.reason: str | None = None

    def __call__(self, signum, _frame):
        self.reason = signal.Signals(signum).name


@cli_errors
def trace(
    expression: Optional[List[str]] = Argument(
        None, metavar="[EXPRESSION]...", show_default=False,
        help="tcpdump filter expression (pcap-filter(7)), e.g. 'udp and dst port 53'; quoted or as separate words. "
             "Runs in the kernel at every packet hook, on the packet as a capture there would see it."),
    dump_filter: bool = Option(False, "--dump-filter",
                               help="Print the expression as classic BPF (like tcpdump -d) and as the eBPF "
                                    "vnet runs, then exit without tracing."),
    interface: List[str] = Option([], "-i", "--interface", metavar="IFACE",
                                  help="Interface to trace; NETNS/IFACE for one in a named netns. Repeatable."),
    probe: List[str] = Option([], "-p", "--probe", metavar="PROBE",
                              help="Catalog probe or glob (net:*, ovs:vport_receive, dev:tap*:ingress); "
                                   "PROBE@HOOK forces one implementation. Repeatable. See 'vnet probes'."),
    strict: bool = Option(False, "--strict", help="Fail if any requested probe is unavailable."),
    pid: List[int] = Option([], "--pid", min=1, max=PID_LIMIT - 1,
                            help="sched:* probes watch this process's threads. Repeatable."),
    min_runq_us: float = Option(0.0, "--min-runq-us", min=0.0,
                                help="sched:runq reports only waits at least this long."),
    count: Optional[int] = Option(None, "-c", "--count", min=1, help="Stop after this many events."),
    duration: Optional[float] = Option(None, "--duration", min=0.0, help="Stop after this many seconds."),
    json_out: bool = Option(False, "--json", help="Print JSON Lines instead of text."),
    write: Optional[Path] = Option(None, "-w", "--write", metavar="FILE",
                                   help="Record raw events to a vnet trace file (the collector's format) "
                                        "instead of printing; read it with -r."),
    page_cache: bool = Option(False, "--page-cache",
                              help="-w: plain writes through the page cache, which absorbs bursts a slow disk "
                                   "cannot take. By default whole blocks go around it (O_DIRECT), as the collector "
                                   "writes: less CPU per event, each write waits for the device."),
    immediate: bool = Option(False, "--immediate-mode", "--immediate",
                             help="-w: write each batch as soon as it is read, as tcpdump --immediate-mode. "
                                  "By default, while the CPUs are busy (under 5% of a CPU idle), up to 1 MiB of "
                                  "events gathers in the ring (at most 100 ms) before a write, which takes about "
                                  "half the reader's CPU; with CPU idle, batches are written at once."),
    read: Optional[Path] = Option(None, "-r", "--read", metavar="FILE",
                                  help="Print the events of a trace file (from -w or the collector)."),
    direction: str = Option("both", "--direction", "-d", help="ingress, egress or both."),
    netns: Optional[str] = Option(None, "--netns", help="Default network namespace for -i names."),
    ring_size: int = Option(DEFAULT_RING_BYTES, "--ring-size", help="Bytes of each event ring (power of two)."),
    rings: Optional[int] = Option(None, "--rings", metavar="N",
                                  help="Event rings the CPUs write to (CPU i to ring i mod N), each of --ring-size "
                                       "bytes. Default: one per CPU, at most 4, so that CPUs emitting at once do "
                                       "not wait for one ring's lock. 1: one ring for all."),
    snaplen: int = Option(0, "--snaplen", "-s", metavar="N",
                          help=f"Copy the first N packet bytes (up to {SNAP_MAX}) into each event, as tcpdump "
                               "would capture them at that hook (for vnet export --to pcapng); 0: none."),
    proto: Optional[str] = Option(None, "--proto", help="Filter: udp, tcp, icmp, icmp6, ip, ip6 or a number."),
    src: Optional[str] = Option(None, "--src", metavar="ADDR[/LEN]", help="Filter: source address or prefix."),
    dst: Optional[str] = Option(None, "--dst", metavar="ADDR[/LEN]", help="Filter: destination."),
    host: Optional[str] = Option(None, "--host", metavar="ADDR[/LEN]", help="Filter: source or destination."),
    sport: Optional[int] = Option(None, "--sport", help="Filter: source port."),
    dport: Optional[int] = Option(None, "--dport", help="Filter: destination port."),
    port: Optional[int] = Option(None, "--port", help="Filter: source or destination port."),
    min_len: Optional[int] = Option(None, "--min-len", min=0, help="Filter: packets at least this long."),
    max_len: Optional[int] = Option(None, "--max-len", min=1, help="Filter: packets at most this long."),
    filter_netns: Optional[str] = Option(None, "--filter-netns", metavar="NETNS",
                                         help="Filter: packets on devices of this network namespace."),
    filter_iface: List[str] = Option([], "--filter-iface", metavar="IFACE",
                                     help="Filter: packets on this device (of --filter-netns). Up to 4."),
    outer: bool = Option(False, "--outer", help="VXLAN: report, identify and filter the outer (underlay) "
                                                "packet instead of the inner one."),
    sample: Optional[str] = Option(None, "--sample", metavar="1/N",
                                   help="Keep 1 packet in N, the same packets at every hook and host."),
    follow: bool = Option(False, "--follow", help="One line (or JSON object) per packet: its path, "
                                                  "hop by hop with the time between hops."),
    follow_idle_ms: float = Option(200.0, "--follow-idle-ms", min=1.0,
                                   help="--follow: a path is complete after this long without a new hop."),
    aggregate: bool = Option(False, "--aggregate", help="No per-packet events: count packets per hook and "
                                                        "histogram the time between hooks, in the kernel."),
    interval: Optional[float] = Option(None, "--interval", min=0.1,
                                       help="--aggregate: also print the numbers every this many seconds."),
    verbose: int = Option(0, "-v", "--verbose", count=True, help="-v: attach details; -vv: libbpf log."),
):
    """Trace packets at TC ingress/egress of interfaces and at catalog probes, one line per packet per hook."""
    setup_logging(verbose)
    if direction not in ("both",) + devprobe.DIRECTIONS:
        raise UsageError(f"unknown direction {direction!r} (use ingress, egress or both)")
    directions = devprobe.DIRECTIONS if direction == "both" else (direction,)
    text = " ".join(expression or []).strip() or None
    if read is not None:
        return _read_file(read, json_out, count)
    if dump_filter:
        if text is None:
            raise UsageError("--dump-filter needs a filter expression")
        print("\n".join(dump_expression(text)))
        return
    packet_filter = PacketFilter(proto, src, dst, host, sport, dport, port, min_len, max_len, sample,
                                 filter_netns, tuple(filter_iface) or None, outer or None, text)
    check_snaplen(snaplen)
    check_ring_size(ring_size)
    ring_count(rings)
    if snaplen and aggregate:
        raise UsageError("--snaplen copies packet bytes into events: not with --aggregate")
    packet_filter.config()  # bad filter input fails here, before anything is resolved or loaded
    # presume: the trace's own load tests each probe's hook kind; probed only if that fails (~50 ms less)
    plans, unavailable = select(interface, probe, directions, netns, strict, pids=tuple(pid),
                                min_runq_ns=int(min_runq_us * 1000), presume=True)
    for name, why in unavailable:
        print(f"vnet: skipping {name}: {why}", file=sys.stderr)
    if aggregate and (follow or count is not None):
        raise UsageError("--aggregate prints numbers, not events: it takes --duration/--interval, not -c or --follow")
    if write is not None and (follow or aggregate or str(write) == "-"):
        raise UsageError("-w records raw events to a file: not with --follow, --aggregate or '-' "
                         "(--json prints JSON Lines on stdout)")
    if page_cache and write is None:
        raise UsageError("--page-cache says how -w writes its file: it needs -w")
    if immediate and write is None:
        raise UsageError("--immediate-mode says when -w writes its file: it needs -w")
    if write is not None and write.exists():
        raise UsageError(f"{write} exists: not overwriting a trace file")
    out = sys.stdout
    emit = format_json if json_out else format_text

    stop = _Stop()
    lost_devices: list[str] = []
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    printed = 0
    try:
        with Trace(plans, ring_bytes=ring_size, rings=rings, wakeup_every=DEFAULT_WAKEUP_EVERY, strict=strict,
                   packet_filter=packet_filter, aggregate=aggregate, snaplen=snaplen) as t:
            for name, why in t.skipped:
                print(f"vnet: skipping {name}: {why}", file=sys.stderr)
            probes = list(dict.fromkeys(h.probe for h in t.hooks))
            hooks = ", ".join(p.removeprefix("dev:") for p in probes)
            print(f"vnet: tracing {hooks} ({'/'.join(sorted(t.hook_kinds))}); Ctrl-C to stop", file=sys.stderr)
            # What is printed: one line per event, or with --follow one per packet path.
            if aggregate:
                report = lambda: _aggregate_report(t, json_out or write is not None)  # noqa: E731
                next_report = [time.monotonic() + interval] if interval else [None]

                def lines(evs):  # sched events still arrive as events; the numbers come per interval
                    out_lines = [emit(e) for e in evs]
                    if next_report[0] is not None and time.monotonic() >= next_report[0]:
                        next_report[0] += interval
                        out_lines += report()
                    return out_lines
                final = report
            elif follow:
                from vnet.analysis.paths import PathFollower, format_path, path_record  # statistics: not at start

                follower = PathFollower(len(probes), int(follow_idle_ms * 1_000_000))
                render = (lambda p: format_json(path_record(p))) if (json_out or write) else format_path
                lines = lambda evs: [render(p) for p in follower.add(evs, time.monotonic_ns())]  # noqa: E731
                final = lambda: [render(p) for p in follower.flush()]  # noqa: E731
            else:
                lines = lambda evs: [emit(e) for e in evs]  # noqa: E731
                final = list
            deadline = time.monotonic() + duration if duration is not None else None
            next_check = [time.monotonic() + VANISH_CHECK_S]
            vanished: list[dict] = []

            def check_devices() -> None:
                """Once a second: a traced interface (or its netns) deleted takes its hooks with
                it. Say so once; when nothing is left to trace, stop (error after the summary)."""
                if time.monotonic() < next_check[0]:
                    return
                next_check[0] = time.monotonic() + VANISH_CHECK_S
                for label, why in t.vanished():
                    print(f"vnet: warning: {label} is gone ({why}): its hooks stopped", file=sys.stderr)
                    lost_devices.append(label)
                    from vnet.collector.tracefile import vanished_fields  # rare: not imported at start

                    vanished.append(vanished_fields(label, why))  # -w: a chunk in the file
                if t.all_hooks_gone:
                    stop.reason = stop.reason or "interfaces gone"

            def recording_done() -> bool:
                if deadline is not None and time.monotonic() >= deadline:
                    stop.reason = stop.reason or "duration"
                check_devices()
                return stop.reason is not None

            if write is not None:  # recording: the ring's batches go to the file as they are
                from vnet.trace.recorder import record

                done = record(t, write, ending=recording_done, count=count, vanished=vanished,
                              direct_io=not page_cache, mode="immediate" if immediate else "auto")
                printed = done.events
                if not page_cache and not done.direct_io:
                    log.info("%s: no direct I/O on this file system: written through the page cache", write)
                print(f"vnet: {printed} events written to {write}", file=sys.stderr)
            else:
                while True:
                    timeout = 100 if deadline is None else max(0, min(100, int((deadline - time.monotonic()) * 1000)))
                    events = t.poll(timeout)
                    if deadline is not None and time.monotonic() >= deadline:
                        stop.reason = stop.reason or "duration"
                    check_devices()
                    ending = stop.reason is not None  # a signal landing later is seen on the next turn
                    if ending:
                        events += t.drain()  # what already reached the ring is still shown
                    batch = lines(events) + (final() if ending else [])
                    if count is not None and printed + len(batch) >= count:
                        batch = batch[: count - printed]
                        stop.reason = ending = "count"
                    if batch:
                        try:
                            out.write("".join(line + "\n" for line in batch))
                            out.flush()
                        except BrokenPipeError:
                            stop.reason = ending = "closed output"
                        printed += len(batch)
                    if ending:
                        break
            stats = t.stats()
            nhooks = len(t.hooks)
            skipped = [name for name, _ in unavailable + t.skipped]
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _close_output(out)
    if aggregate:
        print(f"vnet: {stats.seen - stats.filtered} packets counted in the kernel at {nhooks} hooks "
              f"(aggregation: no per-packet events)", file=sys.stderr)
    else:
        print(f"vnet: {printed} events printed, {stats.received} received, {stats.lost} lost (ring buffer full), "
              f"{stats.seen} packets seen at {nhooks} hooks", file=sys.stderr)
    if packet_filter.active:
        print(f"vnet: {stats.filtered} packets left out by the filter", file=sys.stderr)
    if skipped:
        print(f"vnet: {len(skipped)} requested probes skipped (unavailable): {', '.join(skipped)}", file=sys.stderr)
    if stop.reason == "interfaces gone":
        raise NoSuchInterfaceError(f"every traced interface is gone ({', '.join(lost_devices)}): nothing left "
                                   f"to trace")


def dump_expression(text: str) -> list[str]:
    """What `--dump-filter` prints: libpcap's classic programs (tcpdump -d) and vnet's eBPF stub bodies."""
    from vnet.tcpdump import ETHERNET, RAW, compile, ebpf, prejudge, translate

    expr = compile(text)
    pre, at_tc = prejudge.criteria(expr), prejudge.criteria(expr, exclusions=False)
    if not pre:
        first = ["; nothing tested first: the expression alone decides (see docs/tcpdump.md)"]
    elif at_tc == pre:
        first = [f"; tested first on plain IPv4/IPv6 packets (tc; typed kernel hooks reading in place): "
                 f"{prejudge.describe(pre)}"]
    else:  # exclusions: the expression tests them for less at tc
        first = [f"; tested first on plain IPv4/IPv6 packets (typed kernel hooks reading in place): "
                 f"{prejudge.describe(pre)}",
                 f"; ... at tc: {prejudge.describe(at_tc) if at_tc else 'nothing, the expression alone decides'}"]
    out = [f"; expression: {expr.text}", *first,
           "; classic BPF for Ethernet (tcpdump -d):", *expr.dump(ETHERNET),
           "; classic BPF for raw IP (hooks that see L3 only):"]
    out += expr.dump(RAW) if expr.raw is not None else [f";   none: {expr.raw_error} -- nothing matches there"]
    for link in (ETHERNET, RAW):
        if expr.classic(link) is None:
            continue
        body = translate.translate(translate.DIRECT, expr.classic(link))
        out += [f"; eBPF {translate.STUBS[translate.DIRECT]} (TC hooks, {link} devices; direct packet access):",
                *ebpf.listing(body)]
    body = translate.translate(translate.PROBE, expr.ethernet, expr.raw)
    out += [f"; eBPF {translate.STUBS[translate.PROBE]} (tracepoints, fentry, kprobes, VLAN-tagged TC packets; "
            f"loads from a copy of the first {translate.PROBE_WINDOW} bytes, bpf_probe_read_kernel past them):",
            *ebpf.listing(body)]
    return out


def _aggregate_report(t, as_json: bool) -> list[str]:
    points, hists = t.aggregates()
    quantiles = (0.5, 0.9, 0.99)
    if as_json:
        import json

        segments = [{"from": a, "to": b, "packets": h.total,
                     **{f"p{round(q * 100)}_ns": list(h.bounds(h.percentile_bucket(q))) for q in quantiles},
                     "log2_buckets": {str(k): v for k, v in sorted(h.counts.items())}}
                    for (a, b), h in hists.items() if h.total]
        return [json.dumps({"points": {p: {"packets": v.packets, "bytes": v.bytes, "first": v.first,
                                               **({"hist_lost": v.hist_lost} if v.hist_lost else {})}
                                       for p, v in points.items()},
                            "segments": segments}, separators=(",", ":"))]
    # first: packets with no earlier hop in the kernel's table, where they enter the traced path (else lost hops)
    lines = [f"{p:<40} {v.packets:>10} packets {v.bytes:>12} bytes {v.first:>10} first seen here"
             + (f" ({v.hist_lost} pairs not counted: histogram map full)" if v.hist_lost else "")
             for p, v in points.items()]
    for (a, b), h in hists.items():
        if not h.total:
            continue
        pct = ", ".join(f"p{round(q * 100)} {h.bounds(h.percentile_bucket(q))[0] / 1000:g}-"
                        f"{h.bounds(h.percentile_bucket(q))[1] / 1000:g} us" for q in quantiles)
        lines += ["", f"{a} -> {b}: {h.total} packets, {pct}", *h.render()]
    return lines


def _read_file(path: Path, json_out: bool, count: int | None) -> None:
    """-r: the events of a trace file and its rotated parts, as they would have been printed."""
    from vnet.collector.tracefile import TraceFileReader, rotated_paths

    emit = format_json if json_out else format_text
    paths = rotated_paths(path) if path.exists() else []
    if not paths:
        raise UsageError(f"no trace file {path}")
    printed, problems = 0, []
    try:
        for p in paths:
            reader = TraceFileReader(p)
            for ev in reader.events():
                if count is not None and printed >= count:
                    break
                sys.stdout.write(emit(ev) + "\n")
                printed += 1
            if reader.truncated:
                problems.append(f"{p}: {reader.problem} ({reader.ignored_bytes} bytes after the last complete chunk)")
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    for line in problems:
        print(f"vnet: {line}", file=sys.stderr)
    print(f"vnet: {printed} events read from {len(paths)} file(s)", file=sys.stderr)


def _close_output(out) -> None:
    if out is sys.stdout:
        try:
            out.flush()
        except BrokenPipeError:
            pass
    else:
        out.close()
