"""`vnet spec`: trace specs, the TOML files that say what each host of a distributed trace runs."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:  # the spec module is imported when a spec command runs: every vnet command imports this one
    from vnet.dispatch.spec import HostSpec, Spec

from .common import cli_errors

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Trace specs: what each host of a distributed trace runs (TOML).")


@app.command("check")
@cli_errors
def check(
    file: Path = typer.Argument(..., metavar="FILE", help="The trace spec (TOML)."),
    json_out: bool = typer.Option(False, "--json", help="Print each host's control package (JSON) instead."),
):
    """Check a trace spec without running anything and print what each host will run.
    An error names the file, the line and the field, and exits with code 2."""
    from vnet.dispatch import spec as tracespec

    spec = tracespec.load(file)
    if json_out:
        typer.echo(json.dumps(spec.control_packages(), indent=1))
        return
    typer.echo("\n".join(describe(spec)))


def describe(spec: Spec) -> list[str]:
    """The spec as a person reads it: the trace, then per host what its agent runs."""
    hosts = len(spec.hosts)
    key = f" (key {spec.collector.key})" if spec.collector.key else ""
    lines = [f"{spec.source}: trace {spec.name!r} on {hosts} host{'s' if hosts != 1 else ''}",
             *_rows([("record", _record(spec)),
                     ("stops", _stop(spec)),
                     ("ring", f"{_bytes(spec.ring_bytes)} per ring, "
                              f"{spec.rings or 'one per CPU (at most 4)'}{' ring' if spec.rings == 1 else ' rings'}"
                              f" per host, snaplen {spec.snaplen}"
                              f"{' (no packet bytes kept)' if spec.snaplen == 0 else ''}"),
                     ("strict", "yes: a probe a host cannot run fails the trace" if spec.strict
                      else "no: a probe a host cannot run is skipped (and reported)"),
                     ("collector", spec.collector.address + key)])]
    for host in spec.hosts:
        lines += ["", f"host {host.name} (agent {host.agent})", *_rows(_host_rows(host))]
    return lines


def _host_rows(host: HostSpec) -> list[tuple[str, str]]:
    rows = []
    if host.interfaces:
        dirs = " and ".join(host.directions) + (" only" if len(host.directions) == 1 else "")
        rows.append(("interfaces", f"{', '.join(host.interfaces)} ({dirs})"))
    if host.probes:
        rows.append(("probes", ", ".join(host.probes)))
        if list(host.probes) != list(host.run_probes):
            rows.append(("", "= " + ", ".join(host.run_probes)))
    if host.pids or host.min_runq_ns:
        watch = f"threads of pids {', '.join(map(str, host.pids))}" if host.pids else "every thread"
        least = f"; waits of {host.min_runq_ns / 1000:g} us or more" if host.min_runq_ns else ""
        rows.append(("sched", watch + least))
    rows.append(("filter", _filter(host)))
    return rows


def _filter(host: HostSpec) -> str:
    from vnet.dispatch import spec as tracespec
    from vnet.dispatch.spec import FILTER_FIELDS

    parts = []
    for field, value in tracespec.filter_fields(host.filter).items():
        if field == "expression":
            parts.insert(0, f"expression {value!r}")
        elif field in ("netns", "ifaces"):
            shown = ", ".join(value) if isinstance(value, list) else value
            parts.append(f"{FILTER_FIELDS[field]} {shown} (resolved on the host)")
        elif field == "outer":
            parts.append("outer (VXLAN underlay)" if value else "inner packets")
        else:
            parts.append(f"{FILTER_FIELDS[field]} {value}")
    return ", ".join(parts) if parts else "none: every packet"


def _record(spec: Spec) -> str:
    events, numbers = "per-packet events", "in-kernel counters and histograms"
    text = {"events": events, "aggregate": numbers, "both": f"{events} and {numbers}"}[spec.record]
    if spec.interval_s is not None:
        text += f", numbers every {spec.interval_s:g} s"
    return text


def _stop(spec: Spec) -> str:
    if spec.duration_s is not None and spec.count is not None:
        return f"after {spec.duration_s:g} s or {spec.count} events, whichever comes first"
    if spec.duration_s is not None:
        return f"after {spec.duration_s:g} s"
    if spec.count is not None:
        return f"after {spec.count} events (over all hosts)"
    return "when stopped"


def _bytes(n: int) -> str:
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _rows(rows: list[tuple[str, str]]) -> list[str]:
    """Label and value columns, long values wrapped under their column."""
    width = max(len(label) for label, _ in rows) + 2
    out = []
    for label, value in rows:
        out += textwrap.wrap(value, 100, initial_indent=f"  {label:<{width}}", subsequent_indent=" " * (width + 2),
                             break_on_hyphens=False) or [f"  {label}"]
    return out
