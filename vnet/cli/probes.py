"""`vnet probes`: the catalog, and what this kernel can run of it."""

from __future__ import annotations

import json
from typing import List

import typer

from vnet.errors import UsageError
from vnet.probes import catalog, features
from vnet.probes import resolve as resolver

from .common import cli_errors, setup_logging


@cli_errors
def probes(
    patterns: List[str] = typer.Argument(None, metavar="[PATTERN]...", help="Probe names or globs (default: all)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON array."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True),
):
    """List the probe catalog: available here or not, the hook vnet would use, and why not."""
    setup_logging(verbose)
    specs, unmatched = catalog.match(patterns or ["*"])
    if unmatched:
        raise UsageError(f"no probe matches {unmatched[0]!r}")
    tc = "tcx" if features.check("tcx").ok else "clsact"
    rows = [{"probe": "dev:IFACE:ingress|egress", "layer": "device", "available": True, "hook": tc,
             "yields": "packet", "about": "a netdev's TC hook (veth, tap, bridge/OVS port, vxlan, NIC)",
             "reason": "", "passed_over": []}] if not patterns else []
    for spec in specs:
        res = resolver.resolve(spec)
        rows.append({"probe": spec.name, "layer": spec.layer, "available": res.available,
                     "hook": f"{res.hook.kind}:{res.hook.target}" if res.hook else None, "yields": spec.yields,
                     "about": spec.about, "reason": res.reason, "passed_over": res.why_not})
    if json_out:
        typer.echo(json.dumps(rows, indent=1))
        return
    width = max(len(r["probe"]) for r in rows)
    for r in rows:
        state = f"yes  {r['hook']}" if r["available"] else f"no   {r['reason']}"
        typer.echo(f"{r['probe']:<{width}}  {r['layer']:<18} {state}")
    ok = sum(r["available"] for r in rows)
    typer.echo(f"\n{ok} of {len(rows)} probes available on this kernel; 'vnet doctor' explains missing features.")
