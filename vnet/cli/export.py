"""`vnet export FILES... --to FORMAT -o OUT [--plot DIR]`: trace files for other tools, and PNGs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from vnet.errors import UsageError

from .analyze import parse_flow
from .common import cli_errors


@cli_errors
def export(
    files: List[Path] = typer.Argument(..., metavar="FILES...",
                                       help="Trace files (collector's OUT/TRACE/HOST.vnt and rotations, or "
                                            "`vnet trace -w` files) or directories of them."),
    to: Optional[str] = typer.Option(None, "--to", metavar="FORMAT",
                                     help="jsonl (one JSON object per event, merged timeline), perfetto "
                                          "(ui.perfetto.dev), parquet, or pcapng (Wireshark; needs packet "
                                          "bytes: vnet trace --snaplen N)."),
    out: Optional[str] = typer.Option(None, "-o", "--out", metavar="OUT", help="Output file ('-': stdout, jsonl)."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="DIR",
                                        help="Also (or only) write PNGs into DIR: per-segment latency CDF, "
                                             "latency heat map over time, waterfall of the slowest packets."),
    slowest: int = typer.Option(20, "--slowest", min=1, help="Packets in the --plot waterfall."),
    host: List[str] = typer.Option([], "--host", help="Only this host's files. Repeatable."),
    no_sched: bool = typer.Option(False, "--no-sched", help="perfetto: leave out the run-queue wait tracks."),
    flow: Optional[str] = typer.Option(None, "--flow", help="perfetto and --plot: e.g. 'udp 10.0.0.1:5000 > "
                                                            "10.0.0.2:6000'."),
    proto: Optional[str] = typer.Option(None, "--proto", help="perfetto and --plot: udp, tcp, icmp, ... or N."),
    src: Optional[str] = typer.Option(None, "--src", metavar="ADDR[/LEN]"),
    dst: Optional[str] = typer.Option(None, "--dst", metavar="ADDR[/LEN]"),
    sport: Optional[int] = typer.Option(None, "--sport"),
    dport: Optional[int] = typer.Option(None, "--dport"),
):
    """Export trace files: every event as JSON Lines or a Parquet table, or a Perfetto trace with a
    track per hook and flow arrows along each packet's hops; --plot DIR draws PNGs of the latencies.
    Times are on one timeline: the collector's clock, with each host's measured offset applied."""
    from vnet.analysis.extras import require

    require("numpy", "vnet export")
    from vnet.analysis import export as ex

    if to is None and plot is None:
        raise UsageError("nothing to do: give --to FORMAT -o OUT, --plot DIR, or both")
    if to is not None:
        to = to.lower()
        if to not in ex.FORMATS:
            ex.export([], to, out or "-")  # raises the format's error before reading anything
        if out is None:
            raise UsageError(f"--to {to} needs -o OUT")
    filt = parse_flow(flow, proto, src, dst, sport, dport)
    if to is not None:
        done = ex.export(files, to, out, hosts=host or None, flow=filt, sched=not no_sched)
        what = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in done.items())
        print(f"vnet: export: {to} -> {out}: {what}", file=sys.stderr)
    if plot is not None:
        from vnet.analysis.plots import plot_all
        from vnet.analysis.stream import read_table

        ex.require("matplotlib", "--plot")
        table = read_table(files, flow=filt, hosts=host or None)
        if not table.hosts:
            raise UsageError("no readable trace in these files")
        written = plot_all(table, plot, slowest=slowest)
        if not written:
            print("vnet: export: no packet was seen at two hops: nothing to plot", file=sys.stderr)
        for p in written:
            print(f"vnet: export: plot -> {p}", file=sys.stderr)
