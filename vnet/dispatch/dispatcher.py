"""`vnet dispatch SPEC`: one trace across many hosts.

Contact every agent (hello: version, kernel, what it can trace), check each
host can run what the spec asks (per host: which probes are unavailable and
why), start them all, show live progress, stop them together at the end or on
Ctrl-C, and print what each stage lost (normally nothing) and where the data is.

Until every host traces, nothing is printed but a failure: one line naming the
host and the cause, with the exit code the agent gave it (4: interface or netns
not there, 5: probe unsupported, ...), or the channel's (11 wrong key, 12 agent
unreachable). A traced interface that goes away mid-trace is reported per host
as the agents see it; a host with nothing left ends its trace by itself.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from vnet.errors import NoSuchInterfaceError, UnsupportedError, UsageError, VnetError
from vnet.protocol import Channel, PeerUnreachableError, connect

STATUS_EVERY_S = 1.0


class DispatchError(VnetError):
    exit_code = 13


class HostError(VnetError):
    """What went wrong with one host, named, with the exit code of the cause."""

    def __init__(self, host: str, cause: BaseException):
        if isinstance(cause, VnetError):
            message, hint, code = cause.message, cause.hint, cause.exit_code
        else:  # the socket itself: the agent stopped answering or went away
            what = (cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)) or \
                type(cause).__name__
            message, hint, code = f"the agent stopped answering: {what}", None, PeerUnreachableError.exit_code
        super().__init__(f"host {host}: {message}", hint=hint)
        self.host, self.exit_code = host, code


def _first_error(errors: list[HostError]) -> VnetError:
    """One error for several hosts: every host named, the first one's exit code."""
    if len(errors) == 1:
        return errors[0]
    e = VnetError("; ".join(x.message for x in errors), hint=errors[0].hint)
    e.exit_code = errors[0].exit_code
    return e


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
    ended: str = ""    # its trace ended by itself: every traced interface is gone
    vanished: list = field(default_factory=list)   # what the agent reported gone, each once


class Dispatcher:
    def __init__(self, hosts: list[HostRun], key: bytes, *, out=sys.stderr, strict: bool = False):
        if not hosts:
            raise UsageError("the spec names no host")
        self.hosts = hosts
        self.key = key
        self.out = out
        self.strict = strict
        self._stop = threading.Event()
        self._held: list[str] | None = None   # lines said before every host traces
        self._view = None                     # the live table, while it shows

    def say(self, text: str) -> None:
        if self._held is not None:
            self._held.append(text)
        elif self._view is not None:  # above the live table, not through it
            self._view.console.print(text.lstrip("\n"), markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=self.out, flush=True)

    def hold(self) -> None:
        """Keep what is said until release(): a run that fails before it traces prints only its error."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        held, self._held = self._held or [], None
        for text in held:
            self.say(text)

    def _on(self, h: HostRun, what, *args):
        """what(*args) for host h; any failure becomes a HostError naming h."""
        try:
            return what(*args)
        except (VnetError, OSError) as e:
            raise HostError(h.name, e) from None

    def connect_all(self) -> None:
        for h in self.hosts:
            h.channel = self._on(h, connect, h.agent, self.key, "agent")
            h.hello = self._on(h, h.channel.request, {"type": "hello"}, ("hello",))
            if h.hello.get("busy"):
                raise DispatchError(f"host {h.name}: the agent at {h.agent} is already running a trace",
                                    hint="wait for it to end, or stop the dispatcher that started it")
            self.say(f"vnet: {h.name}: agent {h.agent}, vnet {h.hello.get('version')}, "
                     f"kernel {h.hello.get('kernel')}")

    def check_all(self) -> None:
        problems = []
        for h in self.hosts:
            missing = self._on(h, h.channel.request, {"type": "check", "package": h.package},
                               ("checked",))["unavailable"]
            for probe, why in missing:
                self.say(f"vnet: {h.name}: {probe} unavailable: {why}")
                problems.append(f"host {h.name}: probe {probe} unavailable: {why}")
        if problems and self.strict:
            raise UnsupportedError("; ".join(problems), hint="run 'vnet probes' on that host to see what its "
                                   "kernel can trace, or drop --strict to skip them")

    def start_all(self) -> None:
        """All hosts at once (loading and attaching takes a while on each): their
        traces begin within one start's time of each other."""
        from concurrent.futures import ThreadPoolExecutor

        def start(h: HostRun):
            try:
                h.started = self._on(h, h.channel.request, {"type": "start", "package": h.package}, ("started",))
                return None
            except HostError as e:
                return e

        with ThreadPoolExecutor(max_workers=min(32, len(self.hosts))) as pool:
            errors = [e for e in pool.map(start, self.hosts) if e]
        if errors:
            self.stop_all()  # the hosts that did start: never leave them tracing
            raise _first_error(errors)
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
            self._gone(h, st)

    def _gone(self, h: HostRun, st: dict) -> None:
        """What the agent reported gone since the last status (each once); a host with
        nothing left has ended its trace itself: its summary is fetched now."""
        from vnet.collector.tracefile import describe_vanished

        vanished = st.get("vanished") if isinstance(st.get("vanished"), list) else []
        for v in vanished[len(h.vanished):]:
            h.vanished.append(v)
            self.say(f"vnet: {describe_vanished(v, h.name)}")
        ended = st.get("ended")
        if ended and not h.ended:
            h.ended = str(ended)
            self.say(f"vnet: host {h.name}: {h.ended}: its trace ended")
            if h.summary:
                return
            try:
                h.summary = h.channel.request({"type": "stop"}, ("stopped",))
            except (VnetError, OSError, ConnectionError) as e:
                self._lost(h, e)

    def progress_table(self):
        """The live view: one row per host (rich)."""
        from rich.table import Table

        table = Table(title="vnet dispatch", expand=False)
        for col in ("host", "events/s", "events", "kernel lost", "chunks queued", "collector"):
            table.add_column(col, justify="left" if col in ("host", "collector") else "right")
        for h in self.hosts:
            k, sh = h.status.get("kernel", {}), h.status.get("shipper", {})
            state = ("FAILED" if h.failed else "ended (interfaces gone)" if h.ended else
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
                continue
            self._gone(h, h.summary)  # what went away since the last status

    def close(self) -> None:
        for h in self.hosts:
            if h.channel is not None:
                h.channel.close()

    def run(self, duration: float | None, count: int | None, live: bool = True, hold: bool = True) -> dict:
        """Connect, check, start, wait for the end (duration, count or Ctrl-C), stop. The summary.
        `hold`: say nothing until every host traces (False: each step as it happens, for -v)."""
        previous = {s: signal.signal(s, lambda *_: self._stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            if hold:
                self.hold()
            self.connect_all()
            self.check_all()
            self.start_all()
            self.release()
            deadline = time.monotonic() + duration if duration else None
            reason = "Ctrl-C"
            view = None
            if live:
                from rich.console import Console
                from rich.live import Live

                view = Live(self.progress_table(), console=Console(file=self.out), refresh_per_second=2)
                view.start()
                self._view = view
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
                    if all(h.failed or h.ended for h in self.hosts):
                        reason = "nothing left to trace"
                        break
            finally:
                self._view = None
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
        from vnet.collector.tracefile import describe_vanished

        for h in self.hosts:
            for v in h.vanished:
                self.say(f"vnet: {describe_vanished(v, h.name)}")
            if h.ended:
                self.say(f"vnet: host {h.name}: its trace ended early: {h.ended}")
        for h in self.hosts:
            sh = h.summary.get("shipper") or {}
            if sh.get("path"):
                self.say(f"vnet: {h.name}: data at the collector {sh.get('collector')}: {sh['path']}")
        self.say(f"vnet: stopped ({reason}); events lost at each stage: "
                 + ", ".join(f"{k} {v}" for k, v in total.items()))
        return {"reason": reason, "hosts": {h.name: h.summary for h in self.hosts}, "losses": total,
                "failed": {h.name: h.failed for h in self.hosts if h.failed},
                "ended": {h.name: h.ended for h in self.hosts if h.ended},
                "vanished": {h.name: h.vanished for h in self.hosts if h.vanished}}

    @staticmethod
    def outcome(summary: dict) -> VnetError | None:
        """The error a finished run exits with: a host lost mid-trace (13), else a host
        whose every traced interface went away (4, as `vnet trace`); None: all went well."""
        if summary.get("failed"):
            return DispatchError("; ".join(f"host {n}: failed mid-trace ({why})" for n, why in
                                           summary["failed"].items()))
        if summary.get("ended"):
            return NoSuchInterfaceError("; ".join(f"host {n}: {why}" for n, why in summary["ended"].items()))
        return None
