"""A trace: load one object instance per probe, attach it, stream decoded
events from its ring buffers, and account for every loss.

Every instance shares the first one's rings and counters (bpf_map__reuse_fd);
its read-only config carries the probe_id that names it in each event, so
events say where they were taken even where ifindexes repeat across netns.
Each CPU writes to one of the rings (vnet_rings: one per CPU, up to DEFAULT_RINGS
by default), so that CPUs emitting at once do not wait for one ring's lock.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from vnet.analysis.histogram import Log2Histogram
from vnet.binding import BpfObject, Link, RingBuffer
from vnet.binding.btf import ENUM, STRUCT
from vnet.binding.object import possible_cpus
from vnet.binding.ringbatch import BPF_MAP_TYPE_RINGBUF
from vnet.errors import (FD_LIMIT_HINT, BpfError, ProbeUnavailableError, ResourceError, UnsupportedError, UsageError,
                         VerifierError, VnetError)
from vnet.objects import object_path
from vnet.probes import device as devprobe
from vnet.probes import features
from vnet.probes.device import DIRECTIONS, Device

from .filters import FILTER_ON_PCAP, PacketFilter
from .ifnames import InterfaceNames
from .records import EventDecoder

log = logging.getLogger("vnet.trace")
DEFAULT_RING_BYTES = 8 << 20
DEFAULT_WAKEUP_EVERY = 64       # a wakeup check every this many events per CPU and probe (vnet_wakeup_flags)
DEFAULT_WAKEUP_FILL = 4         # ... forcing a wakeup as the unread data crosses 1/this of the ring
SHARED_MAPS = ("vnet_events", "vnet_rings", "vnet_stats", "vnet_agg_points", "vnet_agg_last", "vnet_agg_hist",
               "vnet_areas", "vnet_area_pos")
# Rings of ring_bytes each (as perf's buffers are per CPU): by default one per online CPU, at most
# DEFAULT_RINGS of them (more CPUs share: CPU i writes to ring i mod their number), so that the
# default takes at most DEFAULT_RINGS times the ring's memory on a large host. A ring per CPU
# holds what one CPU emits: a flood on one CPU (every hook of a veth path runs on the sender's)
# has the whole of its ring, as it had the single ring's (splitting one ring's bytes among the
# CPUs lost events there: docs/benchmarks.md).
DEFAULT_RINGS = 4
MAX_RINGS = 64
MAX_PROBES = 128  # enum vnet_limit's VNET_MAX_PROBES; tests/unit check they agree
SNAP_MAX = 256    # enum vnet_snap's VNET_SNAP_MAX: packet bytes an event can carry; tests/unit check they agree
# Objects whose kernel-hook packet parser can read from one copy (bpf/src/vnet_packet.bpf.h: parse_cfg).
PARSE_COPY_OBJECTS = ("skb_trace", "drop")
AGG_MAPS_WHEN_OFF = {"vnet_agg_last": 1, "vnet_agg_hist": 1}  # unused then: keep them small


@dataclass
class Hook:
    """One attachment that is live."""

    probe: str
    kind: str                  # tcx, clsact, tp_btf, raw_tp, tracepoint, fentry, kprobe
    link: Link
    device: Device | None = None
    direction: str | None = None


@dataclass
class Plan:
    """One object instance: what to load, how to configure and attach it, and
    how to label its events ((hook enum value or None) -> label fields)."""

    obj: str
    config_var: str
    config: dict
    programs: tuple[str, ...]
    attach: Callable[[BpfObject], list[Hook]]
    labels: dict
    prepare: Callable[[BpfObject], None] | None = None
    name: str = ""
    filterable: bool = False  # its config has the packet filter (struct vnet_filter)
    link: str = "ethernet"    # TC plans: the device's link type, for the tcpdump expression
    # When the plan's hook was presumed to work (resolve(presume=True)) and its load or attach
    # fails: given that error, the plan to try instead, or raises (vnet.probes.resolve.plan).
    fallback: Callable[[VnetError], "Plan"] | None = None


@dataclass
class AggPoint:
    """Aggregation mode: one point's numbers (struct vnet_agg_point), every CPU summed."""

    packets: int = 0
    bytes: int = 0
    first: int = 0      # packets with no earlier hop to pair with here: where they enter the traced path,
    #                     packets without a pkt_id, or a hop whose entry another packet replaced (never silent)
    hist_lost: int = 0  # hop pairs no histogram counted: the kernel's cell map was full


@dataclass
class TraceStats:
    seen: int = 0      # packets (or calls) the programs ran on
    emitted: int = 0   # events that reached the ring
    lost: int = 0      # events dropped because the ring was full
    received: int = 0  # events user space read
    filtered: int = 0  # packets the in-kernel filter left out, on purpose


def check_snaplen(n: int) -> int:
    if not 0 <= n <= SNAP_MAX:
        raise UsageError(f"snaplen must be 0 (no packet bytes) to {SNAP_MAX} (VNET_SNAP_MAX), got {n}")
    return n


def wakeup_config(ring_bytes: int, wakeup_every: int = DEFAULT_WAKEUP_EVERY, wakeup_bytes: int | None = None) -> dict:
    """The programs' wakeup policy (bpf/src vnet_wakeup_flags), config fields every object has:
    no wakeup for most records; every `wakeup_every`-th record per CPU and probe, a forced wakeup
    as the unread data crosses `wakeup_bytes` (default: a quarter of the ring), else the kernel's adaptive
    one (the reader is woken if it waits with nothing left to read: a trace's first event).
    The readers drain on their timer besides (20 ms; 100 ms when printing)."""
    if wakeup_bytes is None:
        wakeup_bytes = ring_bytes // DEFAULT_WAKEUP_FILL
    if not 0 <= wakeup_bytes <= ring_bytes:
        raise UsageError(f"wakeup threshold {wakeup_bytes} bytes: 0 (wake at every check) to the ring's size, "
                         f"{ring_bytes}")
    return {"wakeup_every": wakeup_every, "wakeup_bytes": wakeup_bytes}


def check_ring_size(n: int) -> int:
    if n < 4096 or n & (n - 1):
        raise UsageError(f"ring buffer size must be a power of two >= 4096 bytes, got {n}")
    return n


def ring_count(rings: int | None = None, cpus: int | None = None) -> int:
    """How many rings: `rings` as asked (checked), or by default one per online CPU (`cpus`),
    at most DEFAULT_RINGS."""
    if rings is not None:
        if not 1 <= rings <= MAX_RINGS:
            raise UsageError(f"rings: 1 to {MAX_RINGS}, got {rings}")
        return rings
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    return max(1, min(cpus, DEFAULT_RINGS))


def area_chunks(ring_bytes: int, rings: int, cpus: int, chunk_bytes: int) -> int:
    """Chunks of each online CPU's event area (cpuarea): the rings' bytes shared among them, as
    a power of two; 0 (no areas: events go to the rings) below one chunk a CPU."""
    per_cpu = ring_bytes * rings // max(cpus, 1) // chunk_bytes
    return 1 << (per_cpu.bit_length() - 1) if per_cpu else 0


def device_plan(dev: Device, directions=DIRECTIONS) -> Plan:
    """TC ingress/egress of one interface (tcx link, else clsact filter)."""

    def attach(obj: BpfObject) -> list[Hook]:
        hooks = []
        for d in directions:
            link, kind = devprobe.attach(obj, dev, d)
            hooks.append(Hook(dev.probe_name(d), kind, link, dev, d))
        return hooks

    labels = {devprobe.hook_values()[d]: {"probe": dev.probe_name(d), "ifname": dev.ifname, "netns": dev.netns,
                                       "layer": "device"} for d in directions}
    return Plan("tc_trace", "tc_cfg", {"l3": int(dev.link != "ethernet")}, tuple(devprobe.PROGRAMS[d] for d in directions), attach, labels,
                name=f"dev:{dev.label}", filterable=True, link=dev.link)


class Trace:
    """Use as a context manager; nothing stays attached after it exits.

    With strict=False a plan whose load or attach fails is skipped and listed
    in `skipped` (probe, reason); the rest run. strict=True raises instead."""

    def __init__(self, plans: list[Plan], *, ring_bytes: int = DEFAULT_RING_BYTES,
                 wakeup_every: int = DEFAULT_WAKEUP_EVERY, wakeup_bytes: int | None = None, strict: bool = True,
                 packet_filter: PacketFilter | None = None, aggregate: bool = False,
                 aggregate_and_events: bool = False, snaplen: int = 0, parse_copy: bool | None = None,
                 parse_direct: bool | None = None, rings: int | None = None, areas: bool = True):
        if not plans:
            raise UsageError("nothing to trace (give -i IFACE or -p PROBE)")
        if len(plans) > MAX_PROBES:
            raise UsageError(f"{len(plans)} probes in one trace: at most {MAX_PROBES} (enum vnet_limit)")
        self.plans = plans
        self.ring_bytes = check_ring_size(ring_bytes)  # each ring's
        self.ring_count = ring_count(rings)  # 1 if the objects cannot have more (start)
        self.rings: list = []  # the ring maps, once started: vnet_events, then the others
        # Packet events go to an area per CPU (vnet/binding/cpuarea.py) unless `areas` is off, the
        # kernel is PREEMPT_RT (two programs could then write one area at once), the CPU is not
        # x86, the rings are too small to share out, or the objects have none (an older build).
        self.use_areas = areas
        self.area_chunks = 0
        self._area_cpus: list[int] = []  # the CPUs with an area: online at the start
        self.areas: list = []  # a reader per CPU's area, once started
        self.rings_ready = threading.Event()  # each CPU writes to its own ring (before: all to the first)
        self._ring_filler: threading.Thread | None = None
        self.wakeup = wakeup_config(self.ring_bytes, wakeup_every, wakeup_bytes)
        self.wakeup_every = wakeup_every
        self.snaplen = check_snaplen(snaplen)  # packet bytes after each packet event (0: the event alone)
        # Kernel hooks parse from one copy of the packet's first bytes where this kernel's
        # verifier can afford it (features "parse_copy"); None: ask the probe, on first use.
        self.parse_copy = parse_copy
        # ... and, with the copy, read the packet in place where the hook's skb is typed and
        # this verifier lets a program load from skb->head (features "parse_direct").
        self.parse_direct = parse_direct
        self.strict = strict
        self.packet_filter = packet_filter or PacketFilter()
        self.filter_config = self.packet_filter.config()  # validated before anything loads
        self._stub_bodies: dict[tuple[str, int], dict[str, bytes]] = {}
        self.aggregate = aggregate or aggregate_and_events
        self.aggregate_and_events = aggregate_and_events  # to check the kernel's numbers against events
        self.labels: dict = {}
        self._btf_file = None
        self.hooks: list[Hook] = []
        self.skipped: list[tuple[str, str]] = []
        self.objects: list[BpfObject] = []
        self._ring: RingBuffer | None = None
        self.received = 0

    def __enter__(self) -> "Trace":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        features.require_privileges(net_admin=True)
        features.require_btf()
        possible_cpus()  # libbpf keeps it: reading the per-CPU counters later needs no descriptor
        labels: dict = {}
        unavailable_only = True
        try:
            for plan in self.plans:
                probe_id = len(self.objects)
                try:
                    plan, (obj, hooks) = self._load_or_fall_back(plan, probe_id)
                except VnetError as e:
                    if self.strict:
                        raise
                    unavailable = isinstance(e, ProbeUnavailableError)
                    self.skipped.append((plan.name, e.reason if unavailable else str(e)))
                    unavailable_only = unavailable_only and unavailable
                    log.info("skipping %s: %s", plan.name, e)
                    continue
                self.hooks += hooks
                labels.update({(probe_id, hook): where for hook, where in plan.labels.items()})
            if not self.objects:
                reasons = "; ".join(f"{name}: {why}" for name, why in self.skipped)
                if unavailable_only:  # found at load time (resolve(presume=True)): what select() says
                    raise UnsupportedError(f"none of the requested probes can run here ({reasons})",
                                           hint="run 'vnet probes' to see what this kernel can trace")
                raise UsageError("no probe could be attached: " + reasons)
            self.labels = labels
            self.decoder = self._decoder(labels)
            log.info("attached %d hooks: %s", len(self.hooks), ", ".join(f"{h.probe} ({h.kind})" for h in self.hooks))
            log.info("%d event ring%s of %d KiB (CPU i writes to ring i mod %d)", len(self.rings),
                     "s" if len(self.rings) > 1 else "", self.ring_bytes >> 10, len(self.rings))
            self._give_cpus_their_rings()
        except BaseException:
            self.close()
            raise

    def _give_cpus_their_rings(self) -> None:
        """Each CPU's slot in vnet_rings, in a thread once everything is attached: the kernel waits
        for an RCU grace period after a map-of-maps update (~8 ms here), which would delay the
        first event. Until then every CPU writes to vnet_events, which every reader reads too.
        `rings_ready` is set when done (or when it failed: said, and the CPUs stay on ring 0)."""
        if len(self.rings) < 2:
            self.rings_ready.set()
            return
        slots, fds = self.objects[0].maps["vnet_rings"], [r.fd for r in self.rings]
        keys = [cpu.to_bytes(4, "little") for cpu in range(possible_cpus())]
        values = [fds[cpu % len(fds)].to_bytes(4, "little") for cpu in range(len(keys))]

        def fill() -> None:
            try:
                try:
                    slots.update_batch(keys, values)
                except BpfError as e:  # a kernel without batch updates of a map of maps
                    log.debug("vnet_rings: %s; one slot at a time", e)
                    for k, v in zip(keys, values):
                        slots.update(k, v)
            except Exception as e:  # noqa: BLE001 - the trace goes on, on one ring
                log.warning("the CPUs' own rings could not be set (%s): every CPU writes to the first ring", e)
            finally:
                self.rings_ready.set()

        self._ring_filler = threading.Thread(target=fill, name="vnet-rings", daemon=True)
        self._ring_filler.start()

    def _aggregate_bits(self) -> int:
        if not self.aggregate:
            return 0
        bits = self.btf_file.enum("vnet_agg")
        return bits["VNET_AGG_ON"] | (bits["VNET_AGG_AND_EVENTS"] if self.aggregate_and_events else 0)

    @property
    def btf_file(self):
        """BTF of an object file, for enum values needed before any object is open."""
        if self._btf_file is None:
            from vnet.binding import Btf

            self._btf_file = Btf.from_file(str(object_path("tc_trace")))
        return self._btf_file

    def _load_or_fall_back(self, plan: Plan, probe_id: int) -> tuple[Plan, tuple[BpfObject, list[Hook]]]:
        try:
            return plan, self._load_parse_way(plan, probe_id)
        except VnetError as e:
            # libbpf 1.1 probes the kernel for global data with a map of its own: out of descriptors,
            # the probe fails, libbpf leaves .rodata uncreated and the verifier refuses the reference
            uncreated = isinstance(e, VerifierError) and "wasn't created" in str(e)
            if (isinstance(e, BpfError) and (uncreated or not isinstance(e, (ResourceError, VerifierError)))
                    and (free := features.fd_headroom()) < features.FD_HEADROOM):
                # libbpf may say ESRCH or EINVAL when it is the open-file limit that stopped it
                raise ResourceError(f"{plan.name}: too many open files: {free} descriptors left after: {e}",
                                    hint=FD_LIMIT_HINT) from None
            if plan.fallback is None:
                raise
            other = plan.fallback(e)  # raises when there is nothing else to try
        return other, self._load_parse_way(other, probe_id)

    def _load_parse_way(self, plan: Plan, probe_id: int) -> tuple[BpfObject, list[Hook]]:
        """_load; where this verifier refuses the packet read in place, or the parse from a
        copy, after all (features said yes, this program says otherwise), once more the next
        way down (in place -> copy -> probe reads), for this and every later plan."""
        while True:
            try:
                return self._load(plan, probe_id)
            except VerifierError as e:
                why = errno.errorcode.get(e.errno, e.errno)
                if self._parse_direct_for(plan):
                    log.warning("%s: the verifier refused reading the packet in place (%s); kernel hooks "
                                "parse from a copy instead", plan.name, why)
                    self.parse_direct = False
                elif self._parse_copy_for(plan):
                    log.warning("%s: the verifier refused the parse from a copy (%s); kernel hooks read each "
                                "header instead", plan.name, why)
                    self.parse_copy = False
                else:
                    raise

    def _parse_copy_for(self, plan: Plan) -> bool:
        """Whether `plan`'s object is loaded with parse_cfg.copy set."""
        if plan.obj not in PARSE_COPY_OBJECTS:
            return False
        if self.parse_copy is None:
            self.parse_copy = features.check("parse_copy").ok
        return self.parse_copy

    def _parse_direct_for(self, plan: Plan) -> bool:
        """Whether `plan`'s object is loaded with parse_cfg.direct set (only with the copy)."""
        if not self._parse_copy_for(plan):
            return False
        if self.parse_direct is None:
            self.parse_direct = features.check("parse_direct").ok
        return self.parse_direct

    def _criteria_for(self, plan: Plan, obj: BpfObject) -> dict:
        """The filter with the criteria of a tcpdump expression `obj` tests first."""
        if not obj.btf.has("vnet_filter_on", ENUM):
            return self.packet_filter.config(prejudge=False)  # an older vnet's object (benchmarks)
        if not obj.btf.has("vnet_plain_test", ENUM):
            return self.packet_filter.config(sctp_ports_later=False, sets=False)  # ... judging SCTP by its ports
        from vnet.tcpdump.prejudge import within

        # At tc the expression reads the packet in place, which tests `not port 22` or `not
        # host X` for less than step 2a does (docs/benchmarks.md): it keeps those to itself.
        flt = self.packet_filter.config(exclusions=False) if plan.obj == "tc_trace" else self.filter_config
        # An object with fewer kinds of criteria: any left out, the rest still only reject
        # what the expression rejects.
        return within(flt, set(obj.config_fields(plan.config_var)))

    def _load(self, plan: Plan, probe_id: int) -> tuple[BpfObject, list[Hook]]:
        obj = BpfObject(object_path(plan.obj))
        try:
            config = {"probe_id": probe_id, **self.wakeup, **plan.config}
            if not self.objects:
                self.area_chunks = self._area_chunks_for(obj)
            if "area_chunks" in obj.config_fields(plan.config_var):
                if self.area_chunks and "vnet_areas" not in obj.maps:
                    raise UsageError(f"{obj.path.name} has a config for event areas but no vnet_areas map")
                config["area_chunks"] = self.area_chunks
            if plan.filterable:  # the packet programs: filter, and numbers instead of events on request
                flt = self.filter_config
                if flt.get("f_on") == FILTER_ON_PCAP:
                    flt = self._criteria_for(plan, obj)
                config.update(flt, aggregate=self._aggregate_bits(), snaplen=self.snaplen)
                if self.packet_filter.compiled is not None:
                    obj.replace_functions(self._expression_code(plan, obj))
            obj.set_config(plan.config_var, config)
            if plan.obj in PARSE_COPY_OBJECTS:
                way = {"copy": int(self._parse_copy_for(plan)), "direct": int(self._parse_direct_for(plan))}
                # objects of an older vnet (benchmarks compare them) have no `direct`: they copy
                obj.set_config("parse_cfg", {k: v for k, v in way.items() if k in obj.config_fields("parse_cfg")})
            if self.objects:
                first = self.objects[0].maps
                for name in SHARED_MAPS:
                    if name in obj.maps and name in first:  # (an older vnet's object has no vnet_rings)
                        obj.maps[name].share(first[name])
            else:
                if "vnet_rings" not in obj.maps and self.ring_count > 1:
                    log.debug("%s has no vnet_rings (an older build): one ring", obj.path.name)
                    self.ring_count = 1
                obj.maps["vnet_events"].max_entries = self.ring_bytes
                if self.ring_count > 1:
                    obj.maps["vnet_rings"].max_entries = possible_cpus()
                if self.area_chunks:
                    obj.maps["vnet_areas"].max_entries = len(self._area_cpus) * self.area_chunks
                    obj.maps["vnet_area_pos"].max_entries = possible_cpus()
                if not self.aggregate:
                    for name, n in AGG_MAPS_WHEN_OFF.items():
                        obj.maps[name].max_entries = n
            obj.keep_programs(plan.programs)
            if plan.prepare:
                plan.prepare(obj)
            obj.load()
            if not self.objects:
                self.rings = self._make_rings(obj)
                if self.area_chunks:
                    from vnet.binding.cpuarea import area_readers

                    self.areas = area_readers(obj, self.area_chunks, self._area_cpus)
            hooks = plan.attach(obj)
        except BaseException:
            obj.close()
            raise
        self.objects.append(obj)
        return obj, hooks

    def _area_chunks_for(self, first: BpfObject) -> int:
        """The event areas' chunks a CPU, for the first object (the others share its maps)."""
        # x86 only: a program publishes a record by a plain store after it, in order there alone
        if (not self.use_areas or "vnet_areas" not in first.maps or os.uname().machine != "x86_64"
                or features.preempt_rt()):
            return 0
        from vnet.binding.cpuarea import online_cpus

        self._area_cpus = [c for c in online_cpus() if c < possible_cpus()]
        chunk = first.btf.enum("vnet_area")["VNET_AREA_CHUNK"]
        return area_chunks(self.ring_bytes, self.ring_count, len(self._area_cpus), chunk)

    def _make_rings(self, obj: BpfObject) -> list:
        """The first object's vnet_events and the other rings (the CPUs get them once everything
        is attached: _give_cpus_their_rings)."""
        rings = [obj.maps["vnet_events"]]
        for i in range(1, self.ring_count):
            rings.append(obj.create_map(BPF_MAP_TYPE_RINGBUF, f"vnet_events_{i}", self.ring_bytes))
        return rings

    def _expression_code(self, plan: Plan, obj: BpfObject) -> dict[str, bytes]:
        """The tcpdump expression as the bodies of the vnet_pcap_* stubs: at TC
        hooks the program for the device's link type, elsewhere both."""
        from vnet.tcpdump import stub_bodies

        expr = self.packet_filter.compiled
        # the probe stub's window, as the object says (objects built before it had none)
        window = obj.btf.enum("vnet_pcap")["VNET_PCAP_WINDOW"] if obj.btf.has("vnet_pcap", ENUM) else 0
        key = (plan.link, window)
        if key not in self._stub_bodies:
            self._stub_bodies[key] = stub_bodies(expr, plan.link, window)
        if plan.obj == "tc_trace" and expr.classic(plan.link) is None:
            log.warning("%s sees IP packets without a link-layer header: the expression %r matches nothing "
                        "there (%s)", plan.name, expr.text, expr.raw_error)
        return self._stub_bodies[key]

    @property
    def btf(self):
        return self.objects[0].btf

    def _decoder(self, labels: dict) -> EventDecoder:
        enums = {name: self.btf.enum(name) for name in ("vnet_hook", "vnet_event_flag", "vnet_event_kind")}
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; wall time = monotonic + this offset.
        offset = time.time_ns() - time.monotonic_ns()
        # objects built before vnet_event_more (VNET_BPF_DIR, a benchmark's older build) have one packet struct
        more = self.btf.struct("vnet_event_more") if self.btf.has("vnet_event_more", STRUCT) else None
        return EventDecoder(self.btf.struct("vnet_event"), enums, labels, offset, ifnames=InterfaceNames(),
                            sched_layout=self.btf.struct("vnet_sched_event"), more_layout=more)

    @property
    def ring(self) -> RingBuffer:
        """libbpf's reader of the event rings (poll, drain), made on first use: `vnet trace -w`
        and the agent read batches instead (batch_reader()), and every reader maps the whole
        of each ring, twice over (16 MiB more resident memory for the default rings)."""
        if self._ring is None:
            if not self.objects:
                raise UsageError("the trace is not started")
            self._ring = RingBuffer(*self.rings)
        return self._ring

    def batch_reader(self):
        """A reader of batches from every ring (RingGroupReader): bytes, no Python per event."""
        from vnet.binding.ringbatch import RingGroupReader

        if not self.objects:
            raise UsageError("the trace is not started")
        return RingGroupReader(self.rings, self.areas)

    @property
    def hook_kinds(self) -> set[str]:
        return {h.kind for h in self.hooks}

    def poll(self, timeout_ms: int = 100) -> list[dict]:
        """Wait up to timeout_ms, return every event that has arrived, decoded, in time order."""
        if any(a.pending() for a in self.areas):
            timeout_ms = 0  # events are there: no wait for a wakeup
        raw = self.ring.poll(timeout_ms) + self._area_records()
        self.received += len(raw)
        decode = self.decoder.decode
        return self._in_order([decode(r) for r in raw])

    def _area_records(self) -> list[bytes]:
        """What the CPUs' event areas hold, record by record (for poll/drain: the printing path)."""
        from vnet.binding.ringbatch import records

        out: list[bytes] = []
        for reader in self.areas:
            if reader.pending():
                out += [bytes(r) for r in records(reader.read().data)]
        return out

    def _in_order(self, events: list[dict]) -> list[dict]:
        """One ring's records come in the order they were written, several rings' one after another."""
        if len(self.rings) > 1 or self.areas:
            events.sort(key=lambda e: e["ts_ns"])
        return events

    def poll_until(self, until: Callable[[list[dict]], bool], timeout: float) -> list[dict]:
        """Poll until `until(events so far)` holds or `timeout` s pass; then drain."""
        events: list[dict] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events += self.poll(100)
            if until(events):
                break
        return events + self.drain()

    def drain_raw(self) -> list[bytes]:
        """Every record the rings and the CPUs' areas hold, undecoded (rings first)."""
        return self.ring.drain() + self._area_records()

    def drain(self) -> list[dict]:
        raw = self.drain_raw()
        self.received += len(raw)
        return self._in_order([self.decoder.decode(r) for r in raw])

    def per_cpu_counters(self) -> dict[int, dict[str, list[int]]]:
        """Kernel counters per probe_id, per CPU (names from enum vnet_stat: seen, emitted, lost, filtered)."""
        index = self.btf.enum("vnet_stat")
        layout = self.btf.struct("vnet_stats")
        stats_map = self.objects[0].maps["vnet_stats"]
        out = {}
        for probe_id in range(len(self.objects)):
            rows = [layout.decode(raw)["v"] for raw in stats_map.lookup(probe_id.to_bytes(4, "little"))]
            out[probe_id] = {name.removeprefix("VNET_STAT_").lower(): [r[i] for r in rows]
                             for name, i in index.items() if name != "VNET_STAT_MAX"}
        return out

    def _counters(self, per_cpu: dict[int, dict[str, list[int]]] | None = None) -> dict[int, dict[str, int]]:
        """Kernel counters per probe_id, summed over CPUs."""
        per_cpu = self.per_cpu_counters() if per_cpu is None else per_cpu
        return {pid: {name: sum(cpus) for name, cpus in c.items()} for pid, c in per_cpu.items()}

    def gather_bytes(self, most: int) -> int:
        """What a pacing reader lets gather in the ring before it reads (RingBatchReader.hold):
        at most `most` and an eighth of a ring, and never past the programs' forced-wakeup
        mark, so that wakeup always finds it there (0 where they force one at every check)."""
        return min(most, self.ring_bytes // 8, self.wakeup["wakeup_bytes"])

    def stats(self) -> TraceStats:
        """The kernel's counters, every probe and CPU summed."""
        total = {"seen": 0, "emitted": 0, "lost": 0, "filtered": 0}
        for counters in self._counters().values():
            for k in total:
                total[k] += counters.get(k, 0)
        return TraceStats(received=self.received, **total)

    def probe_stats(self, per_cpu: dict[int, dict[str, list[int]]] | None = None) -> dict[str, dict[str, int]]:
        """The kernel's counters per probe (a device probe's ingress and egress count together);
        `per_cpu`: a per_cpu_counters() reading to use instead of reading the map again."""
        names = {probe_id: where["probe"].rsplit(":", 1)[0] if where["probe"].startswith("dev:") else where["probe"]
                 for (probe_id, _hook), where in self.labels.items()}
        return {names.get(pid, f"probe{pid}"): c for pid, c in self._counters(per_cpu).items()}

    def aggregates(self) -> tuple[dict[str, AggPoint], dict[tuple[str, str], Log2Histogram]]:
        """Aggregation mode: packets, bytes (and packets with no earlier hop) per point, and a
        latency histogram per consecutive pair of points, as the kernel has counted so far.
        Both maps are per CPU: each CPU's numbers are summed here."""
        btf = self.btf
        hooks_per_probe = btf.enum("vnet_agg")["VNET_AGG_HOOKS"]
        hook_names = {v: k.removeprefix("VNET_HOOK_").lower() for k, v in btf.enum("vnet_hook").items()}

        def name(point: int) -> str:
            probe_id, hook = divmod(point, hooks_per_probe)
            where = self.labels.get((probe_id, hook)) or self.labels.get((probe_id, None))
            return where["probe"] if where else f"probe{probe_id}:{hook_names.get(hook, hook)}"

        points_map = self.objects[0].maps["vnet_agg_points"]
        point_layout = btf.struct("vnet_agg_point")
        points = {}
        for probe_id in range(len(self.objects)):
            for hook in range(hooks_per_probe):
                point = probe_id * hooks_per_probe + hook
                rows = [point_layout.decode(v) for v in points_map.lookup(point.to_bytes(4, "little"))]
                total = AggPoint(**{f.name: sum(r[f.name] for r in rows) for f in point_layout.fields})
                if total.packets:
                    points[name(point)] = total
        hist_map = self.objects[0].maps["vnet_agg_hist"]
        key_layout = btf.struct("vnet_agg_key")
        hists: dict[tuple[str, str], Log2Histogram] = {}
        for raw in hist_map.keys():
            per_cpu = hist_map.lookup(raw)
            if per_cpu is None:
                continue
            n = sum(int.from_bytes(v, "little") for v in per_cpu)
            if not n:
                continue
            k = key_layout.decode(raw)
            h = hists.setdefault((name(k["from"]), name(k["to"])), Log2Histogram())
            h.counts[k["bucket"]] = h.counts.get(k["bucket"], 0) + n
        return points, hists

    def vanished(self) -> list[tuple[str, str]]:
        """Traced devices that went away since the last call, each once: (label, why). Their
        hooks went with them (a tcx link or clsact filter lives on its device)."""
        from vnet.probes.device import gone

        out = []
        seen = getattr(self, "_vanished", set())
        for dev in dict.fromkeys(h.device for h in self.hooks if h.device is not None):
            if dev.label in seen:
                continue
            why = gone(dev)
            if why:
                seen.add(dev.label)
                out.append((dev.label, why))
        self._vanished = seen
        return out

    @property
    def all_hooks_gone(self) -> bool:
        """Every hook was on a device, and every one of those devices is gone."""
        gone = getattr(self, "_vanished", set())
        return bool(self.hooks) and all(h.device is not None and h.device.label in gone for h in self.hooks)

    def detach(self) -> None:
        """Stop every hook, keep the ring and the maps: what is in the ring can still be read
        and the counters are final (idempotent)."""
        for h in self.hooks:
            h.link.detach()

    def close(self) -> None:
        """Detach every hook and release every object (idempotent)."""
        if self._ring_filler is not None:
            self._ring_filler.join()  # its descriptors are the objects'
            self._ring_filler = None
        for obj in reversed(self.objects):  # the first owns the ring reader: close it last
            obj.close()
        self._ring = None
        self.rings = []
        self.areas = []
        if self._btf_file is not None:
            self._btf_file.close()
            self._btf_file = None
        self.objects.clear()
        self.hooks.clear()


class DeviceTrace(Trace):
    """TC ingress/egress of the given interfaces."""

    def __init__(self, devices: list[Device], directions=DIRECTIONS, **kw):
        if not devices:
            raise UsageError("no interface to trace (give -i IFACE)")
        bad = [d for d in directions if d not in DIRECTIONS]
        if bad:
            raise UsageError(f"unknown direction {bad[0]!r} (use ingress, egress or both)")
        self.devices = list(dict.fromkeys(devices))
        self.directions = tuple(dict.fromkeys(directions))
        super().__init__([device_plan(d, self.directions) for d in self.devices], **kw)
