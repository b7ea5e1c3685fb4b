"""The kernel counters and the ring of a trace, kept on bpffs while its agent runs, so
that they outlive an agent that is killed (docs/reliability.md, "Agent SIGKILLed").

The ring (`vnet_events`, pinned beside the counters as ring-NAME) keeps what the dead agent
had not read: the next agent start reads it out (Shipper.recover), from where the dead
agent's last queued chunk ended, and unpins it.

At start the agent pins the trace's `vnet_stats` map (seen, emitted, lost, filtered per
probe and CPU) under the pin folder, named after the run, and records the pin in the
stream's `open` file. A clean stop unpins it. If the agent dies, its links and program
fds close with it: tcx links and tracepoint links detach, so the counters stop where the
programs stopped, at the agent's death, and the pin keeps them. The next agent start
(Shipper.recover) reads them, has the collector record them in the `interrupted` chunk,
then unpins them. A pin is left only between a kill and the next agent start with that
spool (or, the collector never taking the interruption, until it does).

A clsact filter (kernels without tcx) is no link: it stays attached after a kill and keeps
counting until the next trace of that interface replaces it, so its counters are read at
the restart, not at the death ("frozen": False).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger("vnet.agent")
DEFAULT_PIN_DIR = Path("/sys/fs/bpf/vnet")
PREFIX = "stats-"
RING_PREFIX = "ring-"
RING_FIELDS = ("ring", "rings")  # what a pin record names its rings by (the first; all of them)
STAT_NAMES = ("seen", "emitted", "lost", "filtered")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # bpffs refuses '.' in names; '/' would be a folder


def pin_name(trace: str, host: str, run: str) -> str:
    return PREFIX + "-".join(_UNSAFE.sub("_", part) for part in (trace, host, run))


def pin(trace, pin_dir: Path, name: str) -> dict | None:
    """Pin `trace`'s counters map as pin_dir/name; what the open file records of it
    (path, layout, hook kinds), or None (logged) when bpffs is not there or pinning fails:
    the trace goes on, and an interruption will say its counters are unknown."""
    from vnet.probes.features import bpffs_problem

    why = bpffs_problem(pin_dir.parent if not pin_dir.exists() else pin_dir)
    if why is None:
        try:
            pin_dir.mkdir(mode=0o700, exist_ok=True)
            path = pin_dir / name
            stats = trace.objects[0].maps["vnet_stats"]
            stats.pin(path)
        except Exception as e:  # noqa: BLE001 - only a killed agent's accounting depends on it
            why = str(e)
    if why is not None:
        log.warning("trace counters not pinned (%s): if this agent is killed, what died with it cannot be "
                    "counted", why)
        return None
    index = trace.btf.enum("vnet_stat")
    record = {"path": str(path), "probes": len(trace.objects), "value_size": stats.value_size,
              "index": {n.removeprefix("VNET_STAT_").lower(): i for n, i in index.items() if n != "VNET_STAT_MAX"},
              "hooks": sorted({h.kind for h in trace.hooks})}
    base = RING_PREFIX + name.removeprefix(PREFIX)
    rings = [str(pin_dir / (base if i == 0 else f"{base}_{i}")) for i in range(len(trace.rings))]
    try:
        for ring, path in zip(trace.rings, rings):
            ring.pin(path)
        # "ring": the first, as an older vnet recovering this stream reads it
        record.update(ring=rings[0], rings=rings)
    except Exception as e:  # noqa: BLE001 - the counters still say how much a kill would lose
        unpin({"rings": rings}, ("rings",))
        log.warning("trace rings not pinned (%s): if this agent is killed, what it had not read dies with it "
                    "(counted)", e)
    return record


def ring_pins(record: dict | None) -> list[str]:
    """The pinned rings `record` names, in ring order ([] if none)."""
    record = record or {}
    rings = record.get("rings")
    if isinstance(rings, list) and rings and all(isinstance(r, str) for r in rings):
        return rings
    return [record["ring"]] if isinstance(record.get("ring"), str) else []  # an older vnet's: one ring


def unpin(record: dict | None, what: tuple[str, ...] = ("path",) + RING_FIELDS) -> None:
    """Remove the pins `record` names: the counters ("path") and the rings ("ring", "rings")."""
    for field in what:
        paths = record.get(field) if record else None
        for path in paths if isinstance(paths, list) else [paths]:
            if not isinstance(path, str):
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot unpin %s: %s", path, e)


def read(record: dict | None) -> tuple[dict | None, str]:
    """The counters a pin holds, every probe and CPU summed ({"seen", "emitted", "lost",
    "filtered", "frozen"}), or None and why they are unknown."""
    from vnet.binding import PinnedMap

    if not record:
        return None, "the dead agent had not pinned its kernel counters (no bpffs where it ran, or an older vnet)"
    try:
        path, probes, size = str(record["path"]), int(record["probes"]), int(record["value_size"])
        index = {str(k): int(v) for k, v in dict(record["index"]).items()}
        with PinnedMap(path) as m:
            total = dict.fromkeys(STAT_NAMES, 0)
            for probe_id in range(probes):
                for raw in m.lookup_per_cpu(probe_id.to_bytes(4, "little"), size) or ():
                    for name, i in index.items():
                        if name in total and 8 * i + 8 <= len(raw):
                            total[name] += int.from_bytes(raw[8 * i:8 * i + 8], "little")
    except Exception as e:  # noqa: BLE001 - a pin removed or a record damaged: said, not fatal
        return None, f"the kernel counters pinned at {record.get('path')} cannot be read ({e}): unknown"
    # a clsact filter outlives its process and counts on: read now, not at the death
    total["frozen"] = "clsact" not in (record.get("hooks") or ())
    return total, ""


def leftovers(pin_dir: Path, known: set[str]) -> list[str]:
    """Pins of vnet's in pin_dir that no spooled stream accounts for (a spool folder removed
    by hand, another spool): listed at the agent's start, never removed by it."""
    try:
        names = os.listdir(pin_dir)
    except OSError:
        return []
    return sorted(str(pin_dir / n) for n in names
                  if n.startswith((PREFIX, RING_PREFIX)) and str(pin_dir / n) not in known)
