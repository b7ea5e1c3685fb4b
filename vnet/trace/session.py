"""A device trace: load the tc object, attach it to every (device, direction),
stream decoded events from the ring buffer, and account for every loss."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vnet.binding import BpfObject, Link, RingBuffer
from vnet.errors import UsageError
from vnet.objects import object_path
from vnet.probes import device as devprobe
from vnet.probes import features
from vnet.probes.device import DIRECTIONS, Device

from .records import EventDecoder

log = logging.getLogger("vnet.trace")
OBJECT = "tc_trace"
DEFAULT_RING_BYTES = 8 << 20
DEFAULT_WAKEUP_EVERY = 64


@dataclass
class Hook:
    device: Device
    direction: str
    kind: str      # "tcx" or "clsact"
    link: Link

    @property
    def probe(self) -> str:
        return self.device.probe_name(self.direction)


@dataclass
class TraceStats:
    seen: int = 0      # packets the programs ran on
    emitted: int = 0   # events that reached the ring
    lost: int = 0      # events dropped because the ring was full
    received: int = 0  # events user space read


def check_ring_size(n: int) -> int:
    if n < 4096 or n & (n - 1):
        raise UsageError(f"ring buffer size must be a power of two >= 4096 bytes, got {n}")
    return n


class DeviceTrace:
    """Use as a context manager; nothing stays attached after it exits."""

    def __init__(self, devices: list[Device], directions=DIRECTIONS, *, ring_bytes: int = DEFAULT_RING_BYTES,
                 wakeup_every: int = DEFAULT_WAKEUP_EVERY):
        if not devices:
            raise UsageError("no interface to trace (give -i IFACE)")
        bad = [d for d in directions if d not in DIRECTIONS]
        if bad:
            raise UsageError(f"unknown direction {bad[0]!r} (use ingress, egress or both)")
        self.devices = list(dict.fromkeys(devices))
        self.directions = tuple(dict.fromkeys(directions))
        self.ring_bytes = check_ring_size(ring_bytes)
        self.wakeup_every = wakeup_every
        self.hooks: list[Hook] = []
        self.objects: list[BpfObject] = []  # one instance per device, sharing ring and counters
        self.ring: RingBuffer | None = None
        self.received = 0

    def __enter__(self) -> "DeviceTrace":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        features.require_privileges(net_admin=True)
        features.require_btf()
        path = object_path(OBJECT)
        keep = [devprobe.PROGRAMS[d] for d in self.directions]
        try:
            for probe_id, dev in enumerate(self.devices):
                obj = BpfObject(path)
                self.objects.append(obj)
                obj.set_config("tc_cfg", {"probe_id": probe_id, "wakeup_every": self.wakeup_every})
                if probe_id == 0:
                    obj.maps["vnet_events"].max_entries = self.ring_bytes
                else:
                    for name in ("vnet_events", "vnet_stats"):
                        obj.maps[name].share(self.objects[0].maps[name])
                obj.keep_programs(keep)
                obj.load()
                for direction in self.directions:
                    link, kind = devprobe.attach(obj, dev, direction)
                    self.hooks.append(Hook(dev, direction, kind, link))
            self.ring = RingBuffer(self.objects[0].maps["vnet_events"])
            self.decoder = self._decoder()
            log.info("attached %d hooks: %s", len(self.hooks), ", ".join(f"{h.probe} ({h.kind})" for h in self.hooks))
        except BaseException:
            self.close()
            raise

    @property
    def btf(self):
        return self.objects[0].btf

    def _decoder(self) -> EventDecoder:
        enums = {name: self.btf.enum(name) for name in ("vnet_hook", "vnet_event_flag")}
        hook_value = {"ingress": enums["vnet_hook"]["VNET_HOOK_TC_INGRESS"],
                      "egress": enums["vnet_hook"]["VNET_HOOK_TC_EGRESS"]}
        probes = {(self.devices.index(h.device), hook_value[h.direction]):
                  {"probe": h.probe, "ifname": h.device.ifname, "netns": h.device.netns} for h in self.hooks}
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; wall time = monotonic + this offset.
        offset = time.time_ns() - time.monotonic_ns()
        return EventDecoder(self.btf.struct("vnet_event"), enums, probes, offset)

    @property
    def hook_kinds(self) -> set[str]:
        return {h.kind for h in self.hooks}

    def poll(self, timeout_ms: int = 100) -> list[dict]:
        """Wait up to timeout_ms, return every event that has arrived, decoded."""
        raw = self.ring.poll(timeout_ms)
        self.received += len(raw)
        decode = self.decoder.decode
        return [decode(r) for r in raw]

    def drain(self) -> list[dict]:
        raw = self.ring.drain()
        self.received += len(raw)
        return [self.decoder.decode(r) for r in raw]

    def stats(self) -> TraceStats:
        """Kernel counters summed over CPUs; indexes come from enum vnet_stat."""
        index = self.btf.enum("vnet_stat")
        layout = self.btf.struct("vnet_stats")
        rows = [layout.decode(raw)["v"] for raw in self.objects[0].maps["vnet_stats"].lookup(b"\0\0\0\0")]
        total = {name: sum(r[i] for r in rows) for name, i in index.items() if name != "VNET_STAT_MAX"}
        return TraceStats(seen=total["VNET_STAT_SEEN"], emitted=total["VNET_STAT_EMITTED"],
                          lost=total["VNET_STAT_LOST"], received=self.received)

    def close(self) -> None:
        """Detach every hook and release the object (idempotent)."""
        for obj in reversed(self.objects):  # the first owns the ring reader: close it last
            obj.close()
        self.objects.clear()
        self.hooks.clear()
