"""`vnet doctor`: what this machine supports, what is missing, and what to do about it.

Exit codes (those of vnet.errors): 0 when everything device and tracepoint
probes need works; 3 (NotPermittedError) without the capabilities; 6
(LibbpfMissingError) when libbpf is missing or older than 1.0; 5
(UnsupportedError) when the kernel lacks a needed feature; 1 when a needed
feature could not be probed (INCONCLUSIVE) and none is known to be missing.
Optional features (kernel-function hooks, classic tracepoints...) never fail it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import typer

from vnet.errors import LibbpfMissingError, NotPermittedError, UnsupportedError, VnetError
from vnet.probes import features as feats
from vnet.probes.features import Feature, Support

from .common import cli_errors, setup_logging

# What device + tracepoint probes need: every group must have one feature that works.
NEEDED: tuple[tuple[str, ...], ...] = (("capabilities",), ("libbpf",), ("btf",), ("ringbuf",),
                                       ("tcx", "clsact"), ("tp_btf", "raw_tp"))
MARKS = {Support.SUPPORTED: "ok", Support.UNSUPPORTED: "missing", Support.INCONCLUSIVE: "?"}
EXIT_OK = 0
EXIT_INCONCLUSIVE = VnetError.exit_code


def verdict(features: Sequence[Feature]) -> tuple[int, str]:
    """The exit code and a one-line summary for these answers."""
    by_name = {f.name: f for f in features}

    def state(group: tuple[str, ...]) -> Support:
        members = [by_name[n] for n in group if n in by_name]
        if any(f.ok for f in members):
            return Support.SUPPORTED
        if members and all(f.support is Support.UNSUPPORTED for f in members):
            return Support.UNSUPPORTED
        return Support.INCONCLUSIVE

    states = {group: state(group) for group in NEEDED}
    label = {group: " or ".join(group) for group in NEEDED}
    if states[("capabilities",)] is not Support.SUPPORTED:
        return NotPermittedError.exit_code, "cannot trace here: missing capabilities (run as root)"
    if states[("libbpf",)] is not Support.SUPPORTED:
        return LibbpfMissingError.exit_code, "cannot trace here: libbpf >= 1.0 is missing"
    missing = [label[g] for g, s in states.items() if s is Support.UNSUPPORTED]
    if missing:
        return UnsupportedError.exit_code, f"cannot trace here: this kernel lacks {', '.join(missing)}"
    unknown = [label[g] for g, s in states.items() if s is Support.INCONCLUSIVE]
    if unknown:
        return EXIT_INCONCLUSIVE, f"could not find out whether this kernel has {', '.join(unknown)}"
    needed = {n for g in NEEDED for n in g}
    tc = "tcx" if by_name["tcx"].ok else "clsact"
    tp = "tp_btf" if by_name["tp_btf"].ok else "raw_tp"
    summary = f"device probes ({tc}) and tracepoint probes ({tp}) work here"
    optional = [f.name for f in features if f.name not in needed and not f.ok]
    if optional:
        summary += f"; not available: {', '.join(optional)}"
    if not any(by_name[n].ok for n in ("fentry", "kprobe") if n in by_name):
        summary += "; no kernel-function probes (need fentry or kprobe)"
    return EXIT_OK, summary


def render(features: Sequence[Feature]) -> list[str]:
    width = max(len(f.name) for f in features)
    lines = []
    for f in features:
        line = f"{MARKS[f.support]:<8} {f.name:<{width}}  {f.detail}"
        if not f.ok and f.hint:
            line += f"  (hint: {f.hint})"
        lines.append(line)
    return lines


@cli_errors
def doctor(
    json_out: bool = typer.Option(False, "--json", help="Print a JSON array of {name, support, detail, requires, hint}."),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True, help="Also show libbpf's messages from probing."),
):
    """Probe what this machine supports (BTF, ring buffers, TC and tracing hooks,
    capabilities, lockdown, libbpf) and say what is missing. Exit 0 when device
    and tracepoint probes work."""
    setup_logging(verbose)
    found = feats.all_features()
    code, summary = verdict(found)
    if json_out:
        typer.echo(json.dumps([{"name": f.name, "support": f.support.value, "detail": f.detail,
                                "requires": f.requires, "hint": f.hint} for f in found], indent=1))
    else:
        for line in render(found):
            typer.echo(line)
        typer.echo(f"\nvnet doctor: {summary}")
    if code:
        raise typer.Exit(code)
