"""`vnet agent`: runs traces on this host when an authenticated dispatcher asks,
and ships the raw event data to the collector the control package names.

Requests (one connection = one dispatcher; one trace at a time per agent):
  hello  -> version, host, kernel, features, probes (available or why not), clock sample
  check  {package} -> which requested probes cannot run here, and why
  start  {package} -> attach, start draining; replies with the hooks attached
  status -> kernel counters, ring losses, chunks queued/acked/dropped, CPU used
  stop   -> detach, ship the final counters, wait for the collector's acks; the summary
  resume {trace, run} -> a dispatcher whose line was cut takes its running trace back
  bye    -> the dispatcher is done with this connection
A dispatcher that leaves mid-trace stops its trace: nothing stays attached. One whose line is
cut (silence past the heartbeat it promised, a timeout, a reset) leaves the trace running for
--orphan-grace seconds, for it to come back and resume; then the agent stops it (Custody).
"""

from __future__ import annotations

import logging
import os
import platform
import re
import resource
import secrets
import socket
import threading
import time
from pathlib import Path

import vnet
from vnet.errors import UsageError, VnetError
from vnet.probes.catalog import PID_LIMIT
from vnet.protocol import Channel
from vnet.protocol.channel import PeerClosed, ProtocolError

from . import counters
from .shipper import Shipper, leftover_queues, ring_mark

log = logging.getLogger("vnet.agent")
# The programs send most records without a wakeup: every 64th per CPU they force one as the
# unread data crosses a quarter of the ring, else the kernel wakes a reader only if it has read everything
# (vnet_wakeup_flags in bpf/src). So below ~350 k events/s (2 MiB in 20 ms) the drain runs
# on this timer, and above it on the forced wakeups. 8 MiB of ring lasts 100 ms at 500 k
# events/s (tools/bench/drain.py).
DRAIN_POLL_MS = 20
BATCH_EVENTS_MAX = 65536     # events per chunk at most (bounded chunk size)
# A chunk costs ~0.3 ms of fixed work between agent and collector (pack, HMAC, send, ack,
# the collector's write): at low rates the agent lets the ring hold what came for up to
# SHIP_DELAY_MS, unless SHIP_MIN_BYTES are waiting (at 100 k events/s: ~7,000 events a chunk,
# not 2,000). The ring has room: 1 MiB is 1/8 of the default 8 MiB.
SHIP_MIN_BYTES = 1 << 20
SHIP_DELAY_MS = 100
FLUSH_TIMEOUT_S = 30.0
VANISH_CHECK_S = 1.0   # how often the traced interfaces are looked for (as `vnet trace`)
DEFAULT_QUEUE_DIR = Path("/dev/shm/vnet")  # the memory queue's files: tmpfs, they outlive a killed agent
ORPHAN_GRACE_S = 60.0  # a trace whose dispatcher's line was cut runs on this long for it to come back
WATCH_S = 0.5          # how often silence and the grace are looked at
HEARTBEAT_RANGE_S = (1.0, 600.0)   # what a dispatcher may promise (status "heartbeat_s")
ENDED_KEPT = 16        # summaries of traces stopped at the grace's end, for a dispatcher that comes back late


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def host_name() -> str:
    return socket.gethostname().split(".")[0] or "host"


class AgentTrace:
    """One trace on this host: the Trace, its drain thread and its shipper."""

    def __init__(self, package: dict, key: bytes, spool_dir: Path, host: str, queue_bytes: int = 64 << 20,
                 spool_bytes: int = 1 << 30, pin_dir: Path | None = None, queue_dir: Path | None = None):
        from vnet.trace import Trace
        from vnet.trace.selection import select

        self.package = package
        self.name = _field(package, "trace", str)
        self.host = host
        from vnet.dispatch.spec import control_package_to_filter
        from vnet.probes.device import DIRECTIONS

        flt = control_package_to_filter(package)
        flt.config()  # a bad filter fails here, before anything is attached
        record = package.get("record", "events")
        if record not in ("events", "aggregate", "both"):
            raise UsageError(f"record {record!r}: use events, aggregate or both")
        strict = bool(package.get("strict"))
        plans, self.unavailable = select(list(package.get("interfaces") or []), list(package.get("probes") or []),
                                         tuple(package.get("directions") or DIRECTIONS), strict=strict,
                                         pids=tuple(package.get("pids") or ()),
                                         min_runq_ns=int(package.get("min_runq_ns") or 0))
        collector = package.get("collector") or {}
        address = _field(collector, "address", str)
        _give_back_memory()  # the plans are made: the resolver's BTF is not needed while loading
        # The rings only, no per-CPU event areas (vnet/binding/cpuarea.py): a successor of a killed
        # agent reads what it had not from the pinned rings (counters.pin), and areas are not pinned yet.
        self.trace = Trace(plans, ring_bytes=int(package.get("ring_bytes") or 8 << 20), rings=package.get("rings"),
                           strict=strict, areas=False,
                           packet_filter=flt, aggregate=record != "events", aggregate_and_events=record == "both",
                           snaplen=int(package.get("snaplen") or 0))
        self.trace.start()
        try:
            # The header reads the kernel's BTF again (~11 MiB while parsed): before the ring
            # is mapped (8 MiB resident from then on), so the two never add up.
            header = self._header()
            _give_back_memory()
            self.reader = self.trace.batch_reader()
            self.want = self.trace.gather_bytes(SHIP_MIN_BYTES)  # a chunk's worth
            # This run of the trace: the collector files it apart from earlier runs of the same
            # trace name, and its spool folder is its own (a restarted agent resends it: recover()).
            self.run = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}"
            header["run"] = self.run
            # The kernel's counters outlive a killed agent on bpffs: the next start tells the
            # collector how many events died with it (vnet/agent/counters.py).
            self.pinned = counters.pin(self.trace, pin_dir or counters.DEFAULT_PIN_DIR,
                                       counters.pin_name(self.name, host, self.run))
        except BaseException:
            self.trace.close()
            raise
        try:
            self.shipper = Shipper(address, key, {"trace": self.name, "host": host, "run": self.run,
                                                  "header": header},
                                   spool_dir=spool_dir / self.name / host / self.run, memory_bytes=queue_bytes,
                                   spool_bytes=spool_bytes, pinned=self.pinned,
                                   clsact=[h.link.left_behind() for h in self.trace.hooks if h.kind == "clsact"],
                                   queue_dir=queue_dir / self.name / host / self.run if queue_dir else None)
        except BaseException:
            counters.unpin(self.pinned)
            self.trace.close()
            raise
        self.events = 0
        self.chunks = 0
        self.started = time.monotonic()
        self.cpu0 = _cpu_s()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._stop_lock = threading.Lock()
        self._summary: dict | None = None
        self._final: dict | None = None     # the last status, taken before the objects are closed
        self.vanished: list[dict] = []      # traced interfaces that went away, each once
        self.ended: str | None = None       # why the trace ended by itself (nothing left to trace)
        self._next_check = time.monotonic() + VANISH_CHECK_S
        self._thread = threading.Thread(target=self._drain, name=f"drain {self.name}", daemon=True)
        self._thread.start()

    def _header(self) -> dict:
        from vnet.collector.tracefile import header_for_trace

        return header_for_trace(self.trace, host=self.host, trace_name=self.name, package=self.package)

    def _drain(self) -> None:
        """Batches straight from the ring to the shipper: bytes, never one Python object per event."""
        try:
            shipped = time.monotonic()
            while not self._stop.is_set():
                if time.monotonic() >= self._next_check and self._check_devices():
                    break  # nothing left to trace: what is in the ring goes below, then stop
                pending = self.reader.pending()
                if not pending:
                    self.reader.wait(DRAIN_POLL_MS)  # the kernel's wakeup, or the timer
                    continue
                # A little there: let more come, but not past the point where, at the rate it
                # came at, `want` is there, nor past the programs' forced wakeup (a burst).
                if self.reader.hold(self.want, time.monotonic() - shipped, SHIP_DELAY_MS, DRAIN_POLL_MS):
                    continue
                self._ship_available()
                shipped = time.monotonic()
            self._ship_available()
        except BaseException as e:  # noqa: BLE001 - reported by status/stop
            log.exception("drain failed")
            self._error = e

    def _check_devices(self) -> bool:
        """Once a second: a traced interface deleted (or its netns) took its hooks with it.
        Recorded once, in the status and as a chunk in the trace file; True when nothing is
        left (every hook was on a device that is gone): the trace then ends by itself."""
        from vnet.collector.tracefile import vanished_fields

        self._next_check = time.monotonic() + VANISH_CHECK_S
        for label, why in self.trace.vanished():
            v = vanished_fields(label, why)
            self.vanished.append(v)
            log.warning("trace %s: %s is gone (%s): its hooks stopped", self.name, label, why)
            self.shipper.put("vanished", **v)
        if not self.trace.all_hooks_gone:
            return False
        self.ended = (f"every traced interface is gone ({', '.join(v['iface'] for v in self.vanished)}): "
                      "nothing left to trace")
        log.warning("trace %s: %s", self.name, self.ended)
        # stop() joins this thread: it runs in its own; the dispatcher's stop gets its summary
        threading.Thread(target=self.stop, name=f"end {self.name}", daemon=True).start()
        return True

    def _ship_available(self) -> None:
        """Every ring's records, a batch from each in turn, until all are empty."""
        shipped = True
        while shipped:
            shipped = False
            for ring, reader, batch in self.reader.batches(BATCH_EVENTS_MAX):  # chunks packed from the ring itself
                # queued (the queue file on tmpfs) before the ring space goes back: a kill loses none of it
                self.shipper.put("events", count=batch.count, records=batch.data,
                                 ring_end=ring_mark(ring, reader.position + batch.nbytes))
                reader.consume(batch)
                self.events += batch.count
                self.chunks += 1
                shipped = True

    def status(self) -> dict:
        final = self._final
        if final is not None:  # stopped (or stopping): the objects are closed or about to be
            return {**final, "running": False}
        s = self.trace.stats()
        sh = self.shipper.stats
        return {"trace": self.name, "running": not self._stop.is_set(), "seconds": time.monotonic() - self.started,
                "cpu_s": _cpu_s() - self.cpu0, "hooks": len(self.trace.hooks),
                "kernel": {"seen": s.seen, "emitted": s.emitted, "lost": s.lost, "filtered": s.filtered},
                "probes": self.trace.probe_stats(),
                "read": self.events, "chunks": self.chunks,
                "ring_fill": self.reader.fill(),  # the fullest ring's
                "shipper": {"connected": sh.connected, "queued": sh.queued, "acked": sh.acked, "spooled": sh.spooled,
                            "dropped_events": sh.dropped_events, "dropped_chunks": sh.dropped_chunks,
                            "spool_full": sh.spool_full, "reconnects": sh.reconnects,
                            "last_error": sh.last_error, "collector": self.shipper.address, "path": sh.path,
                            "collector_full": sh.collector_full, "full_refusals": sh.full_refusals,
                            "queued_events": self.shipper.queued_events, "run": self.run},
                "error": str(self._error) if self._error else None,
                "vanished": list(self.vanished), "ended": self.ended}

    def stop(self) -> dict:
        """Detach, drain what is left, send the final counters, wait for the acks.
        Idempotent: the dispatcher's stop and the agent's exit may race."""
        with self._stop_lock:
            if self._summary is None:
                self._summary = self._stop_once()
            return self._summary

    def _stop_once(self) -> dict:
        # detach first: hooks still firing after the last drain (sched:runq fires all the time)
        # would show up as events the agent never read
        self.trace.detach()
        self._stop.set()
        self._thread.join(timeout=10)
        final = self.status()
        self._final = final
        k = final["kernel"]
        losses = {"kernel_ring_full": k["lost"], "agent_unread": max(0, k["emitted"] - self.events),
                  "agent_spool_full": self.shipper.stats.dropped_events}
        from vnet.collector.tracefile import stats_fields

        self.shipper.put("stats", keep=True, **stats_fields(self.trace))
        self.shipper.put("end", keep=True, kernel=k, events=self.events, chunks=self.chunks, losses=losses,
                         vanished=self.vanished, ended=self.ended)
        self.trace.close()  # detached: nothing of ours stays in the kernel
        counters.unpin(self.pinned)  # the end chunk has the final counters: the pin is not needed
        delivered = self.shipper.flush(FLUSH_TIMEOUT_S)
        sh = self.shipper.stats
        final.update(running=False, delivered=delivered, losses=losses, undelivered_chunks=sh.queued,
                     undelivered_events=self.shipper.queued_events)
        final["shipper"].update(collector_full=sh.collector_full, full_refusals=sh.full_refusals,
                                reconnects=sh.reconnects, acked=sh.acked, queued=sh.queued)
        if delivered:
            self.shipper.close()
        else:  # kept in the spool and sent on in the background (Agent.background): not lost yet
            self.shipper.keep()
            final["kept_in"] = str(self.shipper.spool_dir)
            log.error("trace %s stopped with %d chunks (%d events) not at the collector (%s): kept in %s and "
                      "sent on in the background", self.name, sh.queued, final["undelivered_events"],
                      sh.collector_full or sh.last_error or "no acknowledgement", self.shipper.spool_dir)
        return final

    def hooks(self) -> list[dict]:
        return [{"probe": h.probe, "kind": h.kind} for h in self.trace.hooks]


def _probe_answers() -> dict:
    """What a hello reports of this kernel: features, and every catalog probe resolved."""
    from vnet.probes import catalog, features
    from vnet.probes import resolve as resolver

    probes = {}
    for spec in catalog.CATALOG:
        res = resolver.resolve(spec)
        probes[spec.name] = {"available": res.available,
                             "hook": res.hook.kind if res.available else None,
                             "why": None if res.available else res.reason}
    return {"features": {f.name: f.support.value for f in features.all_features()}, "probes": probes}


def _unavailable(patterns: list[str]) -> list:
    """Which of the requested probes cannot run here, and why (a check request)."""
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver

    out = []
    for pattern in patterns:
        glob, _, force = pattern.partition("@")
        specs, unmatched = catalog.match([glob])
        out += [[u, "no such probe"] for u in unmatched]
        for spec in specs:
            res = resolver.resolve(spec, force or None)
            if not res.available:
                out.append([spec.name, res.reason])
    return out


def _give_back_memory() -> None:
    """After a trace is loaded (or stopped): free the kernel BTF the resolver keeps, and
    ask glibc to return the free pages of its heap: libbpf parsed the kernel's BTF for
    every object it loaded, and malloc keeps that high water otherwise (~12 MiB)."""
    from vnet.probes import resolve

    resolve.release_btf()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _forked(fn):
    """fn() in a forked child (vnet/agent/forked.py): the feature probes and the probe
    resolution load objects and parse the kernel's BTF; none of that memory stays in
    the agent. The module-level locks that work takes are held across the fork."""
    import sys

    from vnet.binding import libbpf, splice
    from vnet.probes import catalog, features, resolve  # noqa: F401 - imported before the fork, not in it

    from .forked import run_forked

    locks = [features._lock, libbpf._lock, splice._lock]
    pcap = sys.modules.get("vnet.binding.pcap")  # not imported: nobody holds its lock
    if pcap is not None:
        locks.append(pcap._lock)
    return run_forked(fn, locks=locks)


def _field(d: dict, name: str, typ):
    v = d.get(name)
    if not isinstance(v, typ):
        raise UsageError(f"control package: {name!r} missing or not a {typ.__name__}")
    return v


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")   # a trace's name becomes a spool folder
_PACKAGE_TYPES = {"interfaces": list, "probes": list, "directions": list, "pids": list, "min_runq_ns": int,
                  "filter": dict, "record": str, "duration_s": (int, float), "count": int, "interval_s": (int, float),
                  "snaplen": int, "ring_bytes": int, "rings": int, "strict": bool, "collector": dict, "hypervisor": str,
                  "host": str, "version": int}


def check_package(package) -> dict:
    """A control package as the spec makes it (vnet.dispatch.spec.Spec.control_package), each field
    of its type, before anything is resolved or attached: it comes from the network (an
    authenticated peer, but a buggy or hostile one must not reach the file system or the kernel
    with values of the wrong shape). Raises UsageError naming the field."""
    if not isinstance(package, dict):
        raise ProtocolError("a control package must be a map")
    name = package.get("trace")
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise UsageError(f"control package: trace name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    for key, typ in _PACKAGE_TYPES.items():
        v = package.get(key)
        if v is not None and (not isinstance(v, typ) or isinstance(v, bool) and typ is int):
            raise UsageError(f"control package: {key!r} is {type(v).__name__}, not {getattr(typ, '__name__', typ)}")
    for key in ("interfaces", "probes", "directions"):
        if not all(isinstance(x, str) and 0 < len(x) <= 256 for x in package.get(key) or ()):
            raise UsageError(f"control package: {key!r} must be a list of names")
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < PID_LIMIT for p in package.get("pids") or ()):
        raise UsageError("control package: 'pids' must be a list of process ids")
    for key in ("min_runq_ns", "snaplen", "ring_bytes", "count"):
        if (package.get(key) or 0) < 0:
            raise UsageError(f"control package: {key!r} must not be negative")
    if not isinstance((package.get("collector") or {}).get("address"), str):
        raise UsageError("control package: 'collector.address' missing or not a string")
    return package


def is_cut(ended: BaseException | None) -> bool:
    """Whether a connection ended as a cut line does (a timeout, a reset, keepalive giving up:
    OSErrors) rather than in order. A plain EOF (PeerClosed) is in order: the dispatcher's
    process ended, normally, on Ctrl-C or killed, and the kernel closed its socket; a network
    cut never produces one (it sends no FIN), and a run id dies with the process that held it,
    so nobody could resume. `bye` and a peer that broke the protocol are in order too."""
    return isinstance(ended, OSError) and not isinstance(ended, PeerClosed)


class Custody:
    """Who holds the running trace: the connection that started or resumed it (`owner`), and
    whether it is unattended (`since`): its owner fell silent past the heartbeat it promised,
    or its connection was cut. An unattended trace runs for `grace` seconds, then is to be
    stopped. Pure state on the caller's clock, under the caller's lock."""

    def __init__(self, grace: float):
        self.grace = grace
        self.clear()

    def clear(self) -> None:
        self.owner = None        # the connection holding the trace (None: cut, or no trace)
        self.heartbeat = None    # its promise: a request at least this often (None: none made)
        self.heard = 0.0         # when it last spoke
        self.since = None        # unattended since (None: attended)
        self.why = ""

    def take(self, owner, now: float):
        """`owner` starts or resumes the trace; the connection that held it before (to close)."""
        previous = self.owner
        self.clear()
        self.owner, self.heard = owner, now
        return previous

    def spoke(self, conn, now: float, heartbeat: float | None = None) -> float | None:
        """A message from `conn`: its owner's silence ends. How long the trace was unattended
        when this ends that, else None."""
        if conn is not self.owner:
            return None
        self.heard = now
        if heartbeat is not None:
            self.heartbeat = heartbeat
        back, self.since = (now - self.since if self.since is not None else None), None
        return back

    def ended(self, conn, now: float, cut: bool, why: str) -> str | None:
        """`conn` ended: "stop" (in order, or no grace), "unattended" (cut: the grace begins,
        or goes on from the owner's silence) or None (not the owner: nothing to do)."""
        if conn is not self.owner:
            return None
        self.owner = None
        if not cut or self.grace <= 0:
            return "stop"
        if self.since is None:
            self.since, self.why = now, why
        return "unattended"

    def tick(self, now: float) -> str | None:
        """"silent": the owner's silence just passed its heartbeat (the grace begins);
        "expired": the grace is over (stop the trace); None: nothing new."""
        if self.since is None and self.owner is not None and self.heartbeat and self.grace > 0 \
                and now - self.heard > self.heartbeat:
            self.since, self.why = now, f"no request for {now - self.heard:.0f} s"
            return "silent"
        if self.since is not None and now >= self.since + self.grace:
            return "expired"
        return None

    def unattended_s(self, now: float) -> float | None:
        return None if self.since is None else now - self.since


class Agent:
    """The request handler of `vnet agent` (see the module docstring)."""

    def __init__(self, key: bytes, spool_dir: str | os.PathLike, host: str | None = None, *,
                 queue_bytes: int = 64 << 20, spool_bytes: int = 1 << 30, pin_dir: str | os.PathLike | None = None,
                 orphan_grace: float = ORPHAN_GRACE_S, queue_dir: str | os.PathLike | None = DEFAULT_QUEUE_DIR):
        self.key = key
        self.queue_dir = Path(queue_dir) if queue_dir else None
        self.pin_dir = Path(pin_dir) if pin_dir is not None else counters.DEFAULT_PIN_DIR
        self.custody = Custody(orphan_grace)
        self._ended: dict[tuple[str, str], dict] = {}  # (trace, run) stopped at the grace's end: why, summary
        self._watch: threading.Thread | None = None
        self._closing = threading.Event()
        self.queue_bytes = queue_bytes
        self.spool_bytes = spool_bytes
        self.spool_dir = Path(spool_dir)
        self.host = host or host_name()
        self.current: AgentTrace | None = None
        self._lock = threading.Lock()
        # A hello's features and probes: the first hello computes them (in a forked child,
        # seconds in an emulated guest), later ones, and a dispatcher that gave up waiting
        # and asks again, get them at once, as when they were cached in-process.
        self._answers: dict | None = None
        self._answers_lock = threading.Lock()
        # Streams still being delivered: traces stopped before the collector had everything,
        # and those a dead agent left in the spool (resent, then recorded as interrupted).
        self.background: list[Shipper] = []
        self._recover()

    def _recover(self) -> None:
        """Every stream a previous agent left in the spool folder (spool/TRACE/HOST/RUN/open)."""
        pins: set[str] = set()
        queues: set[str] = set()
        for opening in sorted(self.spool_dir.glob("*/*/*/open")):
            try:
                shipper = Shipper.recover(opening.parent, self.key, spool_bytes=self.spool_bytes)
            except Exception as e:  # noqa: BLE001 - a damaged folder must not stop the agent
                log.error("cannot resend %s: %s", opening.parent, e)
                continue
            log.warning("resending what a previous agent left in %s (%d chunks)", opening.parent,
                        shipper.stats.queued)
            if shipper.pinned:
                pins.add(str(shipper.pinned.get("path")))
                pins.update(counters.ring_pins(shipper.pinned))
            if shipper.queue_dir is not None:
                queues.add(str(shipper.queue_dir))
            self.background.append(shipper)
        for path in counters.leftovers(self.pin_dir, pins):
            log.warning("pinned trace counters or ring %s belong to no stream in %s (another spool, or removed): "
                        "left as they are; rm %s frees them", path, self.spool_dir, path)
        for path, held in leftover_queues(self.queue_dir, queues):
            log.warning("memory queue %s (%.1f MiB of memory) belongs to no stream in %s (another spool, or "
                        "removed): left as it is; rm -r %s frees it", path, held / (1 << 20), self.spool_dir,
                        Path(path).parent)

    def hello(self) -> dict:
        with self._answers_lock:  # probed once, in a child; kept here as a few KiB of plain data
            if self._answers is None:
                self._answers = _forked(_probe_answers)
            answers = self._answers
        return {"type": "hello", "version": vnet.__version__, "host": self.host, "kernel": platform.release(),
                "features": answers["features"], "probes": answers["probes"],
                "clock": {"mono_ns": time.monotonic_ns(), "real_ns": time.time_ns()},
                "busy": self.current is not None, "orphan_grace_s": self.custody.grace}

    def handle(self, ch: Channel) -> None:
        mine: AgentTrace | None = None
        ended: BaseException | None = None
        try:
            while True:
                msg = ch.recv(("hello", "check", "start", "status", "stop", "resume", "bye"))
                kind = msg["type"]
                self._spoke(ch, msg)
                if kind == "bye":
                    return
                try:
                    if kind == "hello":
                        reply = self.hello()
                    elif kind == "check":
                        reply = {"type": "checked", "unavailable": self.check(msg.get("package"))}
                    elif kind == "start":
                        mine = self.start(msg.get("package"), ch, self._heartbeat(msg))
                        reply = {"type": "started", "hooks": mine.hooks(), "unavailable": mine.unavailable,
                                 "skipped": mine.trace.skipped, "trace": mine.name, "run": mine.run,
                                 "orphan_grace_s": self.custody.grace}
                    elif kind == "resume":
                        t, reply = self.resume(msg, ch)
                        mine = t or mine
                    elif kind == "status":
                        t = mine or self.current
                        reply = {"type": "status", **(t.status() if t else {"running": False}),
                                 "background": self.background_status(), **self._custody_status(t)}
                    else:  # stop
                        if mine is None:
                            raise UsageError("no trace of this connection to stop")
                        summary = self._stop(mine)
                        mine = None
                        reply = {"type": "stopped", **summary}
                except VnetError as e:  # the request failed; the connection carries on
                    reply = {"type": "error", "message": str(e), "exit_code": e.exit_code}
                except Exception as e:  # noqa: BLE001 - a request nothing above foresaw: refused, logged
                    log.exception("request %s from %s failed", kind, ch.peer)
                    reply = {"type": "error", "message": f"the agent could not serve {kind}: {type(e).__name__}: {e}",
                             "exit_code": 7}
                ch.send(reply)
        except BaseException as e:
            ended = e
            raise
        finally:
            if mine is not None:
                self._left(ch, mine, ended)

    # -- who holds the trace ---------------------------------------------------------------------------
    @staticmethod
    def _heartbeat(msg) -> float | None:
        """A dispatcher's promise (start, resume, status "heartbeat_s"): a request at least this often."""
        hb = msg.get("heartbeat_s")
        if not isinstance(hb, (int, float)) or isinstance(hb, bool) or hb != hb:
            return None
        return min(max(float(hb), HEARTBEAT_RANGE_S[0]), HEARTBEAT_RANGE_S[1])

    def _spoke(self, ch: Channel, msg) -> None:
        """Any message from the trace's owner: its silence ends; silence past the heartbeat it
        promised makes the trace unattended (the grace begins)."""
        if self.custody.owner is not ch:  # not the trace's owner (a hello, a status from elsewhere): no lock
            return
        with self._lock:
            t = self.current
            back = self.custody.spoke(ch, time.monotonic(), self._heartbeat(msg)) if t is not None else None
        if back is not None:
            log.warning("dispatcher %s speaks again after %.0f s: trace %s attended again", ch.peer, back, t.name)

    def _left(self, ch: Channel, mine: AgentTrace, ended: BaseException | None) -> None:
        """The connection that held `mine` ended: stop it now (in order: the dispatcher is gone),
        or leave it running for the grace (cut); never attached with nobody to stop it."""
        why = f"{type(ended).__name__}: {ended}" if ended is not None else "bye"
        with self._lock:
            act = self.custody.ended(ch, time.monotonic(), is_cut(ended), why) if self.current is mine else None
        if act == "stop":
            log.warning("dispatcher %s left during trace %s (%s): stopping it", ch.peer, mine.name, why)
            self._stop(mine)
        elif act == "unattended":
            log.warning("dispatcher %s cut off during trace %s (%s): it runs on for up to %.0f s for a dispatcher "
                        "to resume it, then stops", ch.peer, mine.name, why, self.custody.grace)
            self._watching()

    def _custody_status(self, t: AgentTrace | None) -> dict:
        # read without the lock (a start holds it while it loads): a status is a snapshot anyway
        unattended = self.custody.unattended_s(time.monotonic()) if t is not None and t is self.current else None
        return {"orphan_grace_s": self.custody.grace, "unattended_s": unattended}

    def resume(self, msg, ch: Channel) -> tuple[AgentTrace | None, dict]:
        """A dispatcher back after a cut takes its trace (same name and run) back; the
        connection that held it (dead, or about to be found dead) is closed. A trace stopped
        at the grace's end is "gone", with its summary; any other is refused as a start is."""
        name, run = msg.get("trace"), msg.get("run")
        if not isinstance(name, str) or not isinstance(run, str):
            raise UsageError("resume: 'trace' and 'run' must be strings")
        with self._lock:
            t = self.current
            if (name, run) in self._ended:  # stopping or stopped at the grace's end
                return None, {"type": "gone", **self._ended[(name, run)]}
            if t is not None and (t.name, t.run) == (name, run):
                unattended = self.custody.unattended_s(time.monotonic())
                previous = self.custody.take(ch, time.monotonic())
                self.custody.heartbeat = self._heartbeat(msg)
            elif t is not None:
                raise UsageError(f"this agent is already running trace {t.name}")
            else:
                raise UsageError(f"trace {name} (run {run}) does not run on this agent")
        if previous is not None and previous is not ch:
            previous.close()  # its handler wakes up and finds it no longer holds the trace
        log.warning("dispatcher %s resumed trace %s%s", ch.peer, name,
                    f" after {unattended:.0f} s unattended" if unattended is not None else "")
        return t, {"type": "resumed", "trace": name, "run": run, "unattended_s": unattended,
                   "orphan_grace_s": self.custody.grace}

    def _watching(self) -> None:
        """The thread that ends an unattended trace's grace (started once, when first needed)."""
        with self._lock:
            if self._watch is None and self.custody.grace > 0:
                self._watch = threading.Thread(target=self._watch_loop, name="custody", daemon=True)
                self._watch.start()

    def _watch_loop(self) -> None:
        while not self._closing.wait(WATCH_S):
            with self._lock:
                t = self.current
                act = self.custody.tick(time.monotonic()) if t is not None else None
                owner = self.custody.owner
                if act == "expired":  # nobody resumes it from here: it is stopping
                    why = (f"stopped by the agent: no dispatcher for {self.custody.grace:.0f} s after "
                           f"{self.custody.why}")
                    self.custody.clear()
                    self._ended[(t.name, t.run)] = {"why": why}
                    while len(self._ended) > ENDED_KEPT:
                        self._ended.pop(next(iter(self._ended)))
            if act == "silent":
                log.warning("dispatcher %s silent past its heartbeat during trace %s: it runs on for up to %.0f s "
                            "for the dispatcher to speak again or resume it, then stops",
                            getattr(owner, "peer", "?"), t.name, self.custody.grace)
            elif act == "expired":
                log.error("trace %s: %s", t.name, why)
                summary = self._stop(t)
                with self._lock:
                    self._ended[(t.name, t.run)] = {**summary, "why": why}

    def check(self, package) -> list:
        if not isinstance(package, dict):
            raise ProtocolError("check without a package")
        probes = package.get("probes") or []
        if not isinstance(probes, list) or not all(isinstance(p, str) for p in probes):
            raise UsageError("control package: 'probes' must be a list of names")
        patterns = list(probes)
        return _forked(lambda: _unavailable(patterns))

    def start(self, package, owner=None, heartbeat: float | None = None) -> AgentTrace:
        check_package(package)
        with self._lock:
            if self.current is not None:
                raise UsageError(f"this agent is already running trace {self.current.name}")
            try:
                t = self.current = AgentTrace(package, self.key, self.spool_dir, self.host, self.queue_bytes,
                                              self.spool_bytes, self.pin_dir, self.queue_dir)
            finally:
                _give_back_memory()
            self.custody.take(owner, time.monotonic())
            self.custody.heartbeat = heartbeat  # counted from the start's reply
        self._watching()
        return t

    def shutdown(self) -> None:
        """The agent is exiting: stop (detach, flush) the trace that still runs; what is not
        delivered stays in the spool for the next start."""
        self._closing.set()
        t = self.current
        if t is not None:
            log.warning("agent exiting during trace %s: stopping it", t.name)
            self._stop(t)
        for shipper in self.background:
            shipper.close()

    def background_status(self) -> list[dict]:
        self.background = [b for b in self.background if not b.done]
        return [{"trace": b.opening.get("trace"), "run": b.opening.get("run"), "queued": b.stats.queued,
                 "connected": b.stats.connected, "collector_full": b.stats.collector_full,
                 "last_error": b.stats.last_error, "spool": str(b.spool_dir)} for b in self.background]

    def _stop(self, t: AgentTrace) -> dict:
        try:
            summary = t.stop()
            if not summary.get("delivered"):
                self.background.append(t.shipper)
            return summary
        finally:
            with self._lock:
                if self.current is t:
                    self.current = None
                    self.custody.clear()
            _give_back_memory()
