"""`vnet dispatch SPEC`: one trace across many hosts.

Contact every agent (hello: version, kernel, what it can trace), check each
host can run what the spec asks (per host: which probes are unavailable and
why), start them all, show live progress, stop them together at the end or on
Ctrl-C, and print what each stage lost (normally nothing) and where the data is.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from vnet.errors import UsageError, VnetError
from vnet.protocol import Channel, connect

STATUS_EVERY_S = 1.0


class DispatchError(VnetError):
    exit_code = 13


@dataclass
class HostRun:
    name: str
    agent: str
    package: dict
    channel: Channel | None = None
    hello: dict = field(default_factory=dict)
    started: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    last_read: int = 0
    rate: float = 0.0
    failed: str = ""   # the agent went away or broke the protocol mid-trace


class Dispatcher:
    def __init__(self, hosts: list[HostRun], key: bytes, *, out=sys.stderr, strict: bool = False):
        if not hosts:
            raise UsageError("the spec names no host")
        self.hosts = hosts
        self.key = key
        self.out = out
        self.strict = strict
        self._stop = threading.Event()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def connect_all(self) -> None:
        for h in self.hosts:
            h.channel = connect(h.agent, self.key, "agent")
            h.hello = h.channel.request({"type": "hello"}, ("hello",))
            if h.hello.get("busy"):
                raise DispatchError(f"{h.name} ({h.agent}) is already running a trace")
            self.say(f"vnet: {h.name}: agent {h.agent}, vnet {h.hello.get('version')}, "
                     f"kernel {h.hello.get('kernel')}")

    def check_all(self) -> None:
        problems = []
        for h in self.hosts:
            missing = h.channel.request({"type": "check", "package": h.package}, ("checked",))["unavailable"]
            for probe, why in missing:
                self.say(f"vnet: {h.name}: {probe} unavailable: {why}")
                problems.append(f"{h.name}: {probe}")
        if problems and self.strict:
            raise DispatchError(f"unavailable probes: {', '.join(problems)}")

    def start_all(self) -> None:
        """All hosts at once (loading and attaching takes a while on each): their
        traces begin within one start's time of each other."""
        from concurrent.futures import ThreadPoolExecutor

        def start(h: HostRun):
            try:
                h.started = h.channel.request({"type": "start", "package": h.package}, ("started",))
                return None
            except (VnetError, OSError, ConnectionError) as e:
                return f"{h.name}: start failed: {e}"

        with ThreadPoolExecutor(max_workers=min(32, len(self.hosts))) as pool:
            errors = [e for e in pool.map(start, self.hosts) if e]
        if errors:
            self.stop_all()  # the hosts that did start: never leave them tracing
            raise DispatchError("; ".join(errors))
        for h in self.hosts:
            hooks = ", ".join(f"{x['probe']} ({x['kind']})" for x in h.started.get("hooks", []))
            self.say(f"vnet: {h.name}: tracing {hooks or 'nothing'}")

    def _lost(self, h: HostRun, e: BaseException) -> None:
        h.failed = str(e) or type(e).__name__
        self.say(f"\nvnet: {h.name}: agent lost ({h.failed}); its trace stops with its connection")
        if h.channel is not None:
            h.channel.close()

    def poll(self) -> None:
        for h in self.hosts:
            if h.failed:
                continue
            try:
                st = h.channel.request({"type": "status"}, ("status",))
            except (VnetError, OSError, ConnectionError) as e:
                self._lost(h, e)
                continue
            read = int(st.get("read", 0))
            h.rate = (read - h.last_read) / STATUS_EVERY_S
            h.last_read, h.status = read, st

    def progress_table(self):
        """The live view: one row per host (rich)."""
        from rich.table import Table

        table = Table(title="vnet dispatch", expand=False)
        for col in ("host", "events/s", "events", "kernel lost", "chunks queued", "collector"):
            table.add_column(col, justify="left" if col in ("host", "collector") else "right")
        for h in self.hosts:
            k, sh = h.status.get("kernel", {}), h.status.get("shipper", {})
            state = "FAILED" if h.failed else (
                f"cannot write: {sh['collector_full']} (queuing)" if sh.get("collector_full") else
                "connected" if sh.get("connected") else "unreachable (queuing)")
            table.add_row(h.name, f"{h.rate:,.0f}", f"{h.last_read:,}", str(k.get("lost", 0)),
                          str(sh.get("queued", 0)), state)
        return table

    def stop_all(self) -> None:
        for h in self.hosts:
            if h.channel is None or h.summary or not h.started or h.failed:
                continue
            try:
                h.summary = h.channel.request({"type": "stop"}, ("stopped",))
            except (VnetError, OSError, ConnectionError) as e:
                self._lost(h, e)

    def close(self) -> None:
        for h in self.hosts:
            if h.channel is not None:
                h.channel.close()

    def run(self, duration: float | None, count: int | None, live: bool = True) -> dict:
        """Connect, check, start, wait for the end (duration, count or Ctrl-C), stop. The summary."""
        previous = {s: signal.signal(s, lambda *_: self._stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.connect_all()
            self.check_all()
            self.start_all()
            deadline = time.monotonic() + duration if duration else None
            reason = "Ctrl-C"
            view = None
            if live:
                from rich.console import Console
                from rich.live import Live

                view = Live(self.progress_table(), console=Console(file=self.out), refresh_per_second=2)
                view.start()
            try:
                while not self._stop.wait(STATUS_EVERY_S):
                    self.poll()
                    if view is not None:
                        view.update(self.progress_table())
                    if deadline and time.monotonic() >= deadline:
                        reason = "duration"
                        break
                    if count and sum(h.last_read for h in self.hosts) >= count:
                        reason = "count"
                        break
                    if all(h.failed for h in self.hosts):
                        reason = "every agent lost"
                        break
            finally:
                if view is not None:
                    view.stop()
            self.stop_all()
            return self.report(reason)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self.close()

    def report(self, reason: str) -> dict:
        total = {"kernel_ring_full": 0, "agent_unread": 0, "agent_spool_full": 0, "undelivered_chunks": 0,
                 "undelivered_events": 0}
        for h in self.hosts:
            if h.failed:
                self.say(f"vnet: {h.name}: FAILED mid-trace: {h.failed}; what it shipped before is at the collector")
                continue
            s = h.summary
            losses = dict(s.get("losses", {}))
            losses["undelivered_chunks"] = s.get("undelivered_chunks", 0)
            losses["undelivered_events"] = s.get("undelivered_events", 0)
            for k in total:
                total[k] += int(losses.get(k, 0))
            sh = s.get("shipper") or {}
            why = sh.get("collector_full") and f"collector cannot write: {sh['collector_full']}"
            self.say(f"vnet: {h.name}: {s.get('read', 0)} events in {s.get('chunks', 0)} chunks; lost: "
                     + ", ".join(f"{k} {v}" for k, v in losses.items())
                     + ("" if s.get("delivered") else
                        f" -- NOT all chunks acknowledged by the collector ({why or sh.get('last_error') or 'no ack'});"
                        f" kept in {s.get('kept_in')} on the agent and sent on in the background"))
        for h in self.hosts:
            sh = h.summary.get("shipper") or {}
            if sh.get("path"):
                self.say(f"vnet: {h.name}: data at the collector {sh.get('collector')}: {sh['path']}")
        self.say(f"vnet: stopped ({reason}); events lost at each stage: "
                 + ", ".join(f"{k} {v}" for k, v in total.items()))
        return {"reason": reason, "hosts": {h.name: h.summary for h in self.hosts}, "losses": total,
                "failed": {h.name: h.failed for h in self.hosts if h.failed}}
