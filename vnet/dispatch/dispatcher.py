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

Mid-trace, each host is polled in its own thread: a host whose control line is cut
holds up no other. A status unanswered for STATUS_TIMEOUT_S makes the host
"unreachable": its agent keeps tracing (for its --orphan-grace), the dispatcher
reconnects and resumes the trace with a bounded back-off, and declares the agent lost
(exit 13) only once that grace must be over, or when the agent's side is known gone
(its end of the connection closed, nothing listens, or it says the trace is gone).
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from vnet.errors import NoSuchInterfaceError, UnsupportedError, UsageError, VnetError
from vnet.protocol import Channel, PeerClosed, PeerUnreachableError, ProtocolError, connect

STATUS_EVERY_S = 1.0
STATUS_TIMEOUT_S = 10.0    # a status unanswered this long: the host is unreachable (its trace runs on there)
HEARTBEAT_S = 5.0          # promised to each agent (start, every status): silence past it is a cut at its end
RETRY_S = 1.0              # reconnect + resume after a cut, the wait doubling
RETRY_MAX_S = 8.0          # up to this
CONNECT_TIMEOUT_S = 5.0    # a reconnect's connect and handshake
LOST_MARGIN_S = 5.0        # past heartbeat + grace (the agent's own clock and its 0.5 s watch)
STOP_TIMEOUT_S = 75.0      # a stop: the agent detaches, drains and waits up to 30 s (+5) for the collector
WORKER_JOIN_S = STATUS_TIMEOUT_S + 2 * CONNECT_TIMEOUT_S + 5


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
class Reach:
    """The control line to one host mid-trace as the dispatcher sees it: reachable, or
    unreachable since a time, with the back-off of its reconnects and the moment the agent
    must have stopped the trace by itself. Pure state on the caller's clock."""

    grace: float | None = None   # the agent's --orphan-grace (its started reply); None: it keeps none
    heartbeat: float = HEARTBEAT_S
    last_ok: float = 0.0         # the last answer: the agent heard us just before it
    since: float | None = None   # unreachable since
    why: str = ""
    wait: float = RETRY_S
    next_try: float = 0.0
    tries: int = 0

    def ok(self, now: float) -> float | None:
        """An answer: how long the host was unreachable when this ends that, else None."""
        back = None if self.since is None else now - self.since
        self.last_ok, self.since, self.wait, self.tries = now, None, RETRY_S, 0
        return back

    def failed(self, now: float, why: str) -> None:
        """A request or reconnect that failed: the next try after the current wait, doubling."""
        if self.since is None:
            self.since = now
        self.why = why
        self.tries += 1
        self.next_try = now + self.wait
        self.wait = min(RETRY_MAX_S, self.wait * 2)

    def due(self, now: float) -> bool:
        return self.since is not None and now >= self.next_try

    @property
    def lost_at(self) -> float:
        """When the agent must have stopped the trace: silent past the heartbeat, then its grace
        (no grace: at once)."""
        if not self.grace:
            return self.last_ok
        return self.last_ok + self.heartbeat + self.grace + LOST_MARGIN_S

    def given_up(self, now: float) -> bool:
        return self.since is not None and now >= self.lost_at


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
    reach: Reach = field(default_factory=Reach)
    status_at: float = 0.0
    spool_said: bool = False   # its agent's spool full: said once
    worker: threading.Thread | None = None   # its poll, in flight


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
        self.verbose = False                  # -v: every failed reconnect is said too

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

        lock, done = threading.Lock(), [0]
        every_started = threading.Event()

        def start(h: HostRun):
            try:
                h.started = self._on(h, h.channel.request, {"type": "start", "package": h.package,
                                                            "heartbeat_s": HEARTBEAT_S}, ("started",))
            except HostError as e:
                return e
            finally:
                with lock:
                    done[0] += 1
                    if done[0] == len(self.hosts):
                        every_started.set()
            # its agent counts our silence from now on: asked as in the trace while others still start
            while not every_started.wait(STATUS_EVERY_S):
                try:
                    h.channel.request({"type": "status", "heartbeat_s": HEARTBEAT_S}, ("status",),
                                      timeout=STATUS_TIMEOUT_S)
                except (VnetError, OSError):
                    break  # the trace's first poll finds out
            return None

        with ThreadPoolExecutor(max_workers=min(32, len(self.hosts))) as pool:
            errors = [e for e in pool.map(start, self.hosts) if e]
        if errors:
            self.stop_all()  # the hosts that did start: never leave them tracing
            raise _first_error(errors)
        now = time.monotonic()
        for h in self.hosts:
            hooks = ", ".join(f"{x['probe']} ({x['kind']})" for x in h.started.get("hooks", []))
            self.say(f"vnet: {h.name}: tracing {hooks or 'nothing'}")
            grace = h.started.get("orphan_grace_s")
            h.reach = Reach(grace=float(grace) if isinstance(grace, (int, float)) else None, last_ok=now)
            h.status_at = now

    def _lost(self, h: HostRun, e: BaseException | str) -> None:
        h.failed = e if isinstance(e, str) else (str(e) or type(e).__name__)
        self.say(f"\nvnet: {h.name}: agent lost ({h.failed}); its trace stops on the agent")
        if h.channel is not None:
            h.channel.close()  # in order: an agent that still holds the trace stops it now

    @staticmethod
    def _agent_gone(e: BaseException) -> bool:
        """Whether a failed request says the agent's side is gone, not the line: its end closed
        (its process ended: EOF, or a broken pipe on a unix socket), it broke the protocol or
        refused, or nothing listens where it did. A cut line only ever times out or resets."""
        if isinstance(e, ProtocolError):  # a handshake cut short by the line is reported as one: not gone
            return "during authentication" not in str(e)
        return isinstance(e, (PeerClosed, BrokenPipeError)) or \
            isinstance(e, PeerUnreachableError) and e.errno in (errno.ECONNREFUSED, errno.ENOENT)

    def _unreachable(self, h: HostRun, e: BaseException) -> None:
        """A request or reconnect failed: lost if the agent is known gone or its grace must be
        over; else unreachable, retried (the trace runs on there)."""
        if h.failed:  # given up meanwhile (the stop): nothing more to say
            return
        if h.channel is not None:
            h.channel.abort()  # no FIN: the agent would take it, once the line is back, for our exit
            h.channel = None
        why = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
        now = time.monotonic()
        first = h.reach.since is None
        h.reach.failed(now, why)
        if self._agent_gone(e):
            self._lost(h, why)
        elif h.reach.given_up(now):
            self._lost(h, self._past_grace(h, now))
        elif first:
            self.say(f"\nvnet: host {h.name}: agent unreachable ({why}); its trace runs on there; reconnecting "
                     f"(given up after {h.reach.lost_at - now:.0f} s)")
        elif self.verbose:
            self.say(f"vnet: host {h.name}: unreachable (since {now - h.reach.since:.0f} s): {why}; next try in "
                     f"{h.reach.next_try - now:.0f} s")

    @staticmethod
    def _past_grace(h: HostRun, now: float) -> str:
        return (f"unreachable for {now - h.reach.since:.0f} s ({h.reach.why}), past the agent's grace of "
                f"{h.reach.grace or 0:.0f} s: it has stopped the trace by itself")

    def _reconnect(self, h: HostRun) -> bool:
        """Connect again and take the trace back (resume); whether it is back."""
        ch = None
        try:
            ch = connect(h.agent, self.key, "agent", timeout=CONNECT_TIMEOUT_S)
            reply = ch.request({"type": "resume", "trace": h.started.get("trace"), "run": h.started.get("run"),
                                "heartbeat_s": HEARTBEAT_S}, ("resumed", "gone"), timeout=STATUS_TIMEOUT_S)
        except (VnetError, OSError) as e:  # the agent refusing (RemoteError) is lost: see _agent_gone
            if ch is not None:
                ch.abort()
            self._unreachable(h, e)
            return False
        if reply["type"] == "gone":  # stopped by itself at the end of its grace: its summary
            ch.close()
            h.summary = {k: v for k, v in reply.items() if k not in ("type", "why")}
            self._lost(h, str(reply.get("why") or "the trace is gone"))
            return False
        h.channel = ch
        back = h.reach.ok(time.monotonic())
        self.say(f"vnet: host {h.name}: agent reachable again after {back or 0:.0f} s; its trace ran on: resumed")
        return True

    def poll(self, wait: bool = False) -> None:
        """One round: each host's status (or, unreachable, its reconnect) in its own thread."""
        for h in self.hosts:
            if h.failed or h.summary or h.worker is not None and h.worker.is_alive():
                continue
            h.worker = threading.Thread(target=self._poll_host, args=(h,), name=f"poll {h.name}", daemon=True)
            h.worker.start()
        if wait:
            self._join_workers()

    def _join_workers(self, timeout: float = WORKER_JOIN_S) -> None:
        deadline = time.monotonic() + timeout
        for h in self.hosts:
            if h.worker is not None:
                h.worker.join(max(0.0, deadline - time.monotonic()))

    def _poll_host(self, h: HostRun) -> None:
        now = time.monotonic()
        if h.reach.since is not None:
            if h.reach.given_up(now):
                self._lost(h, self._past_grace(h, now))
            elif h.reach.due(now):
                self._reconnect(h)
            return
        try:
            st = h.channel.request({"type": "status", "heartbeat_s": HEARTBEAT_S}, ("status",),
                                   timeout=STATUS_TIMEOUT_S)
        except (VnetError, OSError) as e:
            self._unreachable(h, e)
            return
        now = time.monotonic()
        h.reach.ok(now)
        read = int(st.get("read", 0))
        h.rate = (read - h.last_read) / max(1e-3, now - h.status_at)
        h.last_read, h.status, h.status_at = read, st, now
        sh = st.get("shipper") or {}
        if sh.get("dropped_events") and not h.spool_said:
            h.spool_said = True
            self.say(f"vnet: host {h.name}: agent spool full ({sh.get('spool_full') or 'full'}): what the collector "
                     "has not taken is dropped there and counted (agent_spool_full)")
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
                h.summary = h.channel.request({"type": "stop"}, ("stopped",), timeout=STOP_TIMEOUT_S)
            except (VnetError, OSError) as e:
                self._lost(h, e)

    def progress_table(self):
        """The live view: one row per host (rich)."""
        from rich.table import Table

        table = Table(title="vnet dispatch", expand=False)
        for col in ("host", "events/s", "events", "kernel lost", "chunks queued", "collector"):
            table.add_column(col, justify="left" if col in ("host", "collector") else "right")
        for h in self.hosts:
            k, sh = h.status.get("kernel", {}), h.status.get("shipper", {})
            since = h.reach.since
            state = ("FAILED" if h.failed else "ended (interfaces gone)" if h.ended else
                     f"agent unreachable (since {time.monotonic() - since:.0f} s)" if since is not None else
                     f"cannot write: {sh['collector_full']} (queuing)" if sh.get("collector_full") else
                     "connected" if sh.get("connected") else "unreachable (queuing)")
            if sh.get("dropped_events") and not h.failed:
                state += f"; agent spool full: {sh['dropped_events']:,} events dropped"
            table.add_row(h.name, f"{h.rate:,.0f}", f"{h.last_read:,}", str(k.get("lost", 0)),
                          str(sh.get("queued", 0)), state)
        return table

    def stop_all(self) -> None:
        """Every host at once (each may wait for its collector); a host that is unreachable gets
        one more bounded try, then is reported with what is known of it."""
        from concurrent.futures import ThreadPoolExecutor

        self._join_workers()  # no request of a poll in flight on a channel the stop uses

        def stop(h: HostRun) -> None:
            if h.summary or not h.started or h.failed:
                return
            if h.worker is not None and h.worker.is_alive():
                self._lost(h, f"its last request is unanswered after {WORKER_JOIN_S:.0f} s")
                return
            if h.channel is None or h.reach.since is not None:
                if not self._reconnect(h):
                    if not h.failed:
                        now = time.monotonic()
                        self._lost(h, f"unreachable at the stop (since {now - h.reach.since:.0f} s: {h.reach.why}); "
                                      f"its trace stops by itself within {max(0.0, h.reach.lost_at - now):.0f} s; "
                                      "what it shipped is at the collector")
                    return
            try:
                h.summary = h.channel.request({"type": "stop"}, ("stopped",), timeout=STOP_TIMEOUT_S)
            except (VnetError, OSError) as e:
                self._lost(h, e)
                return
            self._gone(h, h.summary)  # what went away since the last status

        with ThreadPoolExecutor(max_workers=min(32, len(self.hosts))) as pool:
            list(pool.map(stop, self.hosts))

    def close(self) -> None:
        for h in self.hosts:
            if h.channel is not None:
                h.channel.close()

    def _stopped_within(self, seconds: float) -> bool:
        """Whether a stop was asked within `seconds`. Slept in slices, not Event.wait(): the
        signal handler's set() takes the event's lock, and a wait on this same thread may hold
        it at that moment (a deadlock)."""
        end = time.monotonic() + seconds
        while not self._stop.is_set() and (left := end - time.monotonic()) > 0:
            time.sleep(min(0.05, left))
        return self._stop.is_set()

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
                while not self._stopped_within(STATUS_EVERY_S):
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
                if not h.summary.get("losses"):  # no summary of it (one its agent kept is counted below)
                    if h.status:
                        k = h.status.get("kernel") or {}
                        self.say(f"vnet: {h.name}: last known: {h.last_read} events read, kernel emitted "
                                 f"{k.get('emitted', '?')}, lost {k.get('lost', '?')}")
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
