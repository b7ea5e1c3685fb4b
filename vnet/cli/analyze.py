"""`vnet analyze FILES...`: per-segment latency, the tail named, drops and scheduling, offline."""

from __future__ import annotations

import ipaddress
import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from vnet.errors import UsageError

from .common import cli_errors

PROTOS = {"icmp": 1, "tcp": 6, "udp": 17, "icmp6": 58, "sctp": 132}
_FLOW = re.compile(r"^\s*(?:(?P<proto>[a-z0-9]+)\s+)?(?P<src>\S+?)(?::(?P<sport>\d+))?\s*>\s*"
                   r"(?P<dst>\S+?)(?::(?P<dport>\d+))?\s*$")


def _net(text: str):
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        raise UsageError(f"not an address or prefix: {text!r}") from None


def _proto(text: str) -> int:
    if text.isdigit():
        return int(text)
    if text.lower() not in PROTOS:
        raise UsageError(f"unknown protocol {text!r} (one of {', '.join(PROTOS)} or a number)")
    return PROTOS[text.lower()]


def parse_flow(text: str | None, proto, src, dst, sport, dport):
    from vnet.analysis.bulk import Flow

    flow = Flow(proto=_proto(proto) if proto else None, src=_net(src) if src else None,
                dst=_net(dst) if dst else None, sport=sport, dport=dport)
    if text:
        m = _FLOW.match(text)
        if not m:  # IPv6 with a port: [addr]:port
            raise UsageError(f"--flow {text!r}: expected e.g. 'udp 10.0.0.1:5000 > 10.0.0.2:6000'")
        flow.proto = _proto(m["proto"]) if m["proto"] else flow.proto
        flow.src = None if m["src"] in ("*", "any") else _net(m["src"])
        flow.dst = None if m["dst"] in ("*", "any") else _net(m["dst"])
        flow.sport = int(m["sport"]) if m["sport"] else flow.sport
        flow.dport = int(m["dport"]) if m["dport"] else flow.dport
    return flow


@cli_errors
def analyze(
    files: List[Path] = typer.Argument(..., metavar="FILES...",
                                       help="Trace files (collector's OUT/TRACE/HOST.vnt and rotations, or "
                                            "`vnet trace -w` files) or directories of them."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object instead of the tables."),
    hist: bool = typer.Option(False, "--hist", help="Add log2 histograms per segment and path."),
    flow: Optional[str] = typer.Option(None, "--flow", help="e.g. 'udp 10.0.0.1:5000 > 10.0.0.2:6000'."),
    proto: Optional[str] = typer.Option(None, "--proto", help="udp, tcp, icmp, icmp6 or a number."),
    src: Optional[str] = typer.Option(None, "--src", metavar="ADDR[/LEN]"),
    dst: Optional[str] = typer.Option(None, "--dst", metavar="ADDR[/LEN]"),
    sport: Optional[int] = typer.Option(None, "--sport"),
    dport: Optional[int] = typer.Option(None, "--dport"),
    host: List[str] = typer.Option([], "--host", help="Only this host's files. Repeatable."),
    since: Optional[float] = typer.Option(None, "--since", help="Packets first seen this many seconds after the "
                                                                 "trace start, or later."),
    until: Optional[float] = typer.Option(None, "--until", help="... and before this many seconds."),
    slowest: int = typer.Option(0, "--slowest", min=0, help="Show the N slowest packets hop by hop."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="DIR",
                                        help="Also write PNGs there: per-segment CDF, latency over time, "
                                             "the slowest packets hop by hop (as `vnet export --plot`)."),
    max_gap: float = typer.Option(1.0, "--max-gap", min=0.000001, metavar="SECONDS",
                                  help="A packet not seen for this long has left the traced path: later "
                                       "sightings of its pkt_id are a new packet (also bounds how far the "
                                       "hosts' files may run apart in time)."),
    ignore_hop: List[str] = typer.Option([], "--ignore-hop", metavar="HOP",
                                         help="Leave this hop's events out (its exact name as the report "
                                              "shows it, e.g. 'sock:consume_skb'; with --round-trip, 'HOP (reply)' "
                                              "for the replies only). Repeatable."),
    round_trip: bool = typer.Option(False, "--round-trip",
                                    help="Pair each packet of the flow (the requests) with the next unpaired "
                                         "packet of its reverse (the replies), in order, and analyse the round "
                                         "trips: the far end's turnaround becomes a segment. Needs --proto and "
                                         "a port, or --flow; one conversation (filter to one client)."),
    clocks: str = typer.Option("packets", "--clocks", metavar="packets|pings",
                               help="How hosts' clocks are put on the collector's: 'packets' (default) refines "
                                    "the collector's pings with the packets that cross between hosts (one more "
                                    "pass over the files); 'pings' uses the pings alone."),
):
    """Per-hop latency of every packet path in trace files: per-segment percentiles, the segment
    behind the end-to-end tail, where packets vanish, and run-queue waits behind slow packets."""
    from vnet.analysis.extras import require

    require("numpy", "vnet analyze")
    from vnet.analysis.report import analyze as run, render_text
    from vnet.analysis.stream import read_table

    filt = parse_flow(flow, proto, src, dst, sport, dport)
    if round_trip and (filt.proto is None or (filt.sport is None and filt.dport is None)):
        raise UsageError("--round-trip needs the requests' flow: --proto and --sport or --dport (or --flow)")
    if clocks not in ("packets", "pings"):
        raise UsageError(f"--clocks {clocks!r}: use 'packets' or 'pings'")
    # with --round-trip, the requests' and the replies' crossings refine the clocks together
    table = read_table(files, flow=filt, hosts=host or None, gap_ns=int(max_gap * 1e9),
                       sync_clocks=clocks == "packets" and not round_trip)
    if not table.hosts:
        raise UsageError("no readable trace in these files")
    pairing = None
    if round_trip:
        from vnet.analysis.roundtrip import describe, reverse, round_trips

        replies = read_table(files, flow=reverse(filt), hosts=host or None, gap_ns=int(max_gap * 1e9),
                             sync_clocks=False)
        if clocks == "packets":
            from vnet.analysis.stream import sync_tables

            sync_tables([table, replies])
    if clocks == "pings":   # the packets did not move the clocks, but they still order the hops
        from vnet.analysis.stream import causal_order

        for t in (table, replies) if round_trip else (table,):
            causal_order(t)
    if ignore_hop:
        from vnet.analysis.roundtrip import REPLY_SUFFIX
        from vnet.analysis.stream import without_hops

        # with --round-trip, "HOP (reply)" (as the report names it) leaves it out of the replies only
        reply_only = {h.removesuffix(REPLY_SUFFIX) for h in ignore_hop if round_trip and h.endswith(REPLY_SUFFIX)}
        both = [h for h in ignore_hop if not (round_trip and h.endswith(REPLY_SUFFIX))]
        known = set(table.hop_names) | (set(replies.hop_names) if round_trip else set())
        unknown = [h for h in both + sorted(reply_only) if h not in known]
        if unknown:
            raise UsageError(f"--ignore-hop {unknown[0]!r}: no such hop in these files (they have: "
                             f"{', '.join(sorted(known))})")
        table = without_hops(table, both)
        replies = without_hops(replies, both + sorted(reply_only)) if round_trip else None
    if round_trip:
        table, pairing = round_trips(table, replies, int(max_gap * 1e9))
    report = run(table, since=since, until=until, slowest=slowest, hist=hist)
    if pairing is not None:
        report["round_trip"] = pairing
        report["verdict"] = describe(pairing) + " " + report["verdict"]
    if plot is not None:
        from vnet.analysis.plots import plot_all

        require("matplotlib", "--plot")
        from vnet.analysis.report import packets_between

        for p in plot_all(table, plot, slowest=max(slowest, 20), paths=packets_between(table, since, until)):
            print(f"vnet: analyze: plot -> {p}", file=sys.stderr)
    if json_out:
        sys.stdout.write(json.dumps(report, default=_plain) + "\n")
    else:
        sys.stdout.write("\n".join(render_text(report, hist)) + "\n")


def _plain(o):
    try:
        return o.item()  # numpy scalars
    except AttributeError:
        raise TypeError(f"{type(o).__name__} is not JSON serializable") from None
