"""`vnet agent`: runs traces on this host when an authenticated dispatcher asks,
and ships the raw event data to the collector the control package names.

Requests (one connection = one dispatcher; one trace at a time per agent):
  hello  -> version, host, kernel, features, probes (available or why not), clock sample
  check  {package} -> which requested probes cannot run here, and why
  start  {package} -> attach, start draining; replies with the hooks attached
  status -> kernel counters, ring losses, chunks queued/acked/dropped, CPU used
  stop   -> detach, ship the final counters, wait for the collector's acks; the summary
A dispatcher that disconnects mid-trace stops its trace: nothing stays attached.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import socket
import threading
import time
from pathlib import Path

import vnet
from vnet.errors import UsageError, VnetError
from vnet.protocol import Channel
from vnet.protocol.channel import ProtocolError

from .shipper import Shipper

log = logging.getLogger("vnet.agent")
# The programs send most records without a wakeup: every 64th per CPU they force one as the
# unread data crosses a quarter of the ring, else the kernel wakes a reader only if it has read everything
# (vnet_wakeup_flags in bpf/src). So below ~350 k events/s (2 MiB in 20 ms) the drain runs
# on this timer, and above it on the forced wakeups. 8 MiB of ring lasts 100 ms at 500 k
# events/s (tools/bench/drain.py).
DRAIN_POLL_MS = 20
BATCH_EVENTS_MAX = 65536     # events per chunk at most (bounded chunk size)
FLUSH_TIMEOUT_S = 30.0


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def host_name() -> str:
    return socket.gethostname().split(".")[0] or "host"


class AgentTrace:
    """One trace on this host: the Trace, its drain thread and its shipper."""

    def __init__(self, package: dict, key: bytes, spool_dir: Path, host: str, queue_bytes: int = 64 << 20,
                 spool_bytes: int = 1 << 30):
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
        self.trace = Trace(plans, ring_bytes=int(package.get("ring_bytes") or 8 << 20), strict=strict,
                           packet_filter=flt, aggregate=record != "events", aggregate_and_events=record == "both",
                           snaplen=int(package.get("snaplen") or 0))
        self.trace.start()
        try:
            from vnet.binding.ringbatch import RingBatchReader

            self.reader = RingBatchReader(self.trace.objects[0].maps["vnet_events"])
        except BaseException:
            self.trace.close()
            raise
        collector = package.get("collector") or {}
        address = _field(collector, "address", str)
        self.shipper = Shipper(address, key, {"trace": self.name, "host": host, "header": self._header()},
                               spool_dir=spool_dir / self.name / host, memory_bytes=queue_bytes,
                               spool_bytes=spool_bytes)
        self.events = 0
        self.chunks = 0
        self.started = time.monotonic()
        self.cpu0 = _cpu_s()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._stop_lock = threading.Lock()
        self._summary: dict | None = None
        self._thread = threading.Thread(target=self._drain, name=f"drain {self.name}", daemon=True)
        self._thread.start()

    def _header(self) -> dict:
        from vnet.collector.tracefile import header_for_trace

        return header_for_trace(self.trace, host=self.host, trace_name=self.name, package=self.package)

    def _drain(self) -> None:
        """Batches straight from the ring to the shipper: bytes, never one Python object per event."""
        try:
            while not self._stop.is_set():
                self.reader.wait(DRAIN_POLL_MS)
                self._ship_available()
            self._ship_available()
        except BaseException as e:  # noqa: BLE001 - reported by status/stop
            log.exception("drain failed")
            self._error = e

    def _ship_available(self) -> None:
        while True:
            batch = self.reader.peek(max_records=BATCH_EVENTS_MAX)  # the chunk is packed from the ring itself
            if not batch.count:
                self.reader.consume(batch)  # discarded records only, if anything
                return
            self.shipper.put("events", events=batch.count, count=batch.count, records=batch.data)
            self.reader.consume(batch)
            self.events += batch.count
            self.chunks += 1

    def status(self) -> dict:
        s = self.trace.stats()
        sh = self.shipper.stats
        return {"trace": self.name, "running": not self._stop.is_set(), "seconds": time.monotonic() - self.started,
                "cpu_s": _cpu_s() - self.cpu0, "hooks": len(self.trace.hooks),
                "kernel": {"seen": s.seen, "emitted": s.emitted, "lost": s.lost, "filtered": s.filtered},
                "probes": self.trace.probe_stats(),
                "read": self.events, "chunks": self.chunks,
                "ring_fill": self.reader.pending() / max(1, self.trace.ring_bytes),
                "shipper": {"connected": sh.connected, "queued": sh.queued, "acked": sh.acked, "spooled": sh.spooled,
                            "dropped_events": sh.dropped_events, "reconnects": sh.reconnects,
                            "last_error": sh.last_error, "collector": self.shipper.address, "path": sh.path},
                "error": str(self._error) if self._error else None}

    def stop(self) -> dict:
        """Detach, drain what is left, send the final counters, wait for the acks.
        Idempotent: the dispatcher's stop and the agent's exit may race."""
        with self._stop_lock:
            if self._summary is None:
                self._summary = self._stop_once()
            return self._summary

    def _stop_once(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=10)
        final = self.status()
        k = final["kernel"]
        losses = {"kernel_ring_full": k["lost"], "agent_unread": max(0, k["emitted"] - self.events),
                  "agent_spool_full": self.shipper.stats.dropped_events}
        from vnet.collector.tracefile import stats_fields

        self.shipper.put("stats", **stats_fields(self.trace))
        self.shipper.put("end", kernel=k, events=self.events, chunks=self.chunks, losses=losses)
        self.trace.close()  # detached: nothing of ours stays in the kernel
        delivered = self.shipper.flush(FLUSH_TIMEOUT_S)
        self.shipper.close()
        final.update(running=False, delivered=delivered, losses=losses,
                     undelivered_chunks=self.shipper.stats.queued)
        return final

    def hooks(self) -> list[dict]:
        return [{"probe": h.probe, "kind": h.kind} for h in self.trace.hooks]


def _field(d: dict, name: str, typ):
    v = d.get(name)
    if not isinstance(v, typ):
        raise UsageError(f"control package: {name!r} missing or not a {typ.__name__}")
    return v


class Agent:
    """The request handler of `vnet agent` (see the module docstring)."""

    def __init__(self, key: bytes, spool_dir: str | os.PathLike, host: str | None = None, *,
                 queue_bytes: int = 64 << 20, spool_bytes: int = 1 << 30):
        self.key = key
        self.queue_bytes = queue_bytes
        self.spool_bytes = spool_bytes
        self.spool_dir = Path(spool_dir)
        self.host = host or host_name()
        self.current: AgentTrace | None = None
        self._lock = threading.Lock()

    def hello(self) -> dict:
        from vnet.probes import catalog, features
        from vnet.probes import resolve as resolver

        probes = {}
        for spec in catalog.CATALOG:
            res = resolver.resolve(spec)
            probes[spec.name] = {"available": res.available,
                                 "hook": res.hook.kind if res.available else None,
                                 "why": None if res.available else res.reason}
        return {"type": "hello", "version": vnet.__version__, "host": self.host, "kernel": platform.release(),
                "features": {f.name: f.support.value for f in features.all_features()},
                "probes": probes, "clock": {"mono_ns": time.monotonic_ns(), "real_ns": time.time_ns()},
                "busy": self.current is not None}

    def handle(self, ch: Channel) -> None:
        mine: AgentTrace | None = None
        try:
            while True:
                msg = ch.recv(("hello", "check", "start", "status", "stop", "bye"))
                kind = msg["type"]
                try:
                    if kind == "hello":
                        ch.send(self.hello())
                    elif kind == "check":
                        ch.send({"type": "checked", "unavailable": self.check(msg.get("package"))})
                    elif kind == "start":
                        mine = self.start(msg.get("package"))
                        ch.send({"type": "started", "hooks": mine.hooks(), "unavailable": mine.unavailable,
                                 "skipped": mine.trace.skipped})
                    elif kind == "status":
                        ch.send({"type": "status", **(mine or self.current).status()} if (mine or self.current)
                                else {"type": "status", "running": False})
                    elif kind == "stop":
                        if mine is None:
                            raise UsageError("no trace of this connection to stop")
                        summary = self._stop(mine)
                        mine = None
                        ch.send({"type": "stopped", **summary})
                    else:
                        return
                except VnetError as e:  # the request failed; the connection carries on
                    ch.send({"type": "error", "message": str(e), "exit_code": e.exit_code})
        finally:
            if mine is not None:  # the dispatcher went away: never leave a trace attached
                log.warning("dispatcher %s left during trace %s: stopping it", ch.peer, mine.name)
                self._stop(mine)

    def check(self, package) -> list:
        from vnet.probes import catalog
        from vnet.probes import resolve as resolver

        if not isinstance(package, dict):
            raise ProtocolError("check without a package")
        out = []
        for pattern in package.get("probes") or []:
            glob, _, force = str(pattern).partition("@")
            specs, unmatched = catalog.match([glob])
            out += [[u, "no such probe"] for u in unmatched]
            for spec in specs:
                res = resolver.resolve(spec, force or None)
                if not res.available:
                    out.append([spec.name, res.reason])
        return out

    def start(self, package) -> AgentTrace:
        if not isinstance(package, dict):
            raise ProtocolError("start without a package")
        with self._lock:
            if self.current is not None:
                raise UsageError(f"this agent is already running trace {self.current.name}")
            self.current = AgentTrace(package, self.key, self.spool_dir, self.host, self.queue_bytes,
                                      self.spool_bytes)
            return self.current

    def shutdown(self) -> None:
        """The agent is exiting: stop (detach, flush) the trace that still runs."""
        t = self.current
        if t is not None:
            log.warning("agent exiting during trace %s: stopping it", t.name)
            self._stop(t)

    def _stop(self, t: AgentTrace) -> dict:
        try:
            return t.stop()
        finally:
            with self._lock:
                if self.current is t:
                    self.current = None
