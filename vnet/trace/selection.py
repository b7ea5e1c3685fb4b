"""From what the user asked for (-i interfaces, -p probe names and globs) to
trace plans, plus the probes that cannot run here and why."""

from __future__ import annotations

from vnet.errors import ProbeUnavailableError, UnsupportedError, UsageError
from vnet.probes import catalog
from vnet.probes import device as devprobe
from vnet.probes import resolve as resolver

from .session import Plan, device_plan


def select(interfaces: list[str], probes: list[str], directions=devprobe.DIRECTIONS,
           default_netns: str | None = None, strict: bool = False, *, pids: tuple[int, ...] = (),
           min_runq_ns: int = 0, presume: bool = False) -> tuple[list[Plan], list[tuple[str, str]]]:
    """Plans in the order asked, and (probe, reason) for each unavailable one.
    strict: an unavailable probe is an error instead of a skip. pids and
    min_runq_ns go to scheduler probes. presume: hooks whose kind is not probed yet
    are tried by the trace itself (vnet.probes.resolve.resolve), as `vnet trace` does."""
    wanted: dict[devprobe.Device, list[str]] = {}
    for spec in interfaces:
        dev = devprobe.resolve(spec, default_netns)
        wanted.setdefault(dev, [])
        wanted[dev] += [d for d in directions if d not in wanted[dev]]
    catalog_patterns = []
    for pattern in probes:
        if pattern.startswith("dev:"):
            for dev, d in devprobe.expand(pattern, default_netns):
                wanted.setdefault(dev, [])
                if d not in wanted[dev]:
                    wanted[dev].append(d)
        else:
            catalog_patterns.append(pattern)
    plans = [device_plan(dev, tuple(d for d in devprobe.DIRECTIONS if d in dirs)) for dev, dirs in wanted.items()]

    skipped: list[tuple[str, str]] = []
    for pattern in catalog_patterns:
        glob, _, force = pattern.partition("@")
        specs, unmatched = catalog.match([glob])
        if unmatched:
            raise UsageError(f"no probe matches {glob!r} (list them with 'vnet probes')")
        for spec in specs:
            res = resolver.resolve(spec, force or None, presume=presume)
            if res.available:
                plans.append(resolver.plan(res, pids=pids, min_runq_ns=min_runq_ns))
            elif strict:
                raise ProbeUnavailableError(spec.name, res.reason)
            else:
                skipped.append((spec.name, res.reason))
    if not plans:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped)
        if skipped:
            raise UnsupportedError(f"none of the requested probes can run here ({reasons})",
                                   hint="run 'vnet probes' to see what this kernel can trace")
        raise UsageError("nothing to trace: give -i IFACE or -p PROBE")
    return plans, skipped
