"""The line between dispatcher and agent, as pure state on a given clock: who holds the
agent's trace and for how long it runs unattended (Custody), and how the dispatcher backs
off, resumes and gives a host up (Reach). The real cut: tests/kernel/test_faults.py."""

from __future__ import annotations

import errno
import time

import pytest

from vnet.agent.agent import Custody, is_cut
from vnet.dispatch.dispatcher import (HEARTBEAT_S, LOST_MARGIN_S, RETRY_MAX_S, RETRY_S, Dispatcher, HostRun,
                                      Reach)
from vnet.protocol import PeerClosed, PeerUnreachableError, ProtocolError
from vnet.protocol.channel import AuthError, RemoteError

A, B = object(), object()  # two connections


def test_an_orderly_end_stops_at_once_a_cut_leaves_the_grace():
    c = Custody(grace=60)
    c.take(A, now=0)
    assert c.ended(B, 1, cut=True, why="x") is None  # not the owner: nothing to do
    assert c.ended(A, 1, cut=False, why="bye") == "stop"
    c.take(A, now=0)
    assert c.ended(A, 2, cut=True, why="reset") == "unattended" and c.unattended_s(5) == 3
    assert c.tick(61) is None and c.tick(62) == "expired"


def test_no_grace_stops_at_once_even_when_cut():
    c = Custody(grace=0)
    c.take(A, 0)
    c.spoke(A, 1, heartbeat=5)
    assert c.tick(100) is None  # silence alone never stops a trace without a grace
    assert c.ended(A, 100, cut=True, why="timed out") == "stop"


def test_silence_past_the_heartbeat_starts_the_grace_and_a_word_ends_it():
    c = Custody(grace=10)
    c.take(A, 0)
    assert c.tick(1000) is None  # no heartbeat promised (a plain client): silence is nothing
    c.spoke(A, 1000, heartbeat=5)
    assert c.tick(1004) is None and c.tick(1005.5) == "silent" and c.tick(1006) is None
    assert c.spoke(B, 1008) is None and c.unattended_s(1008) == 2.5  # another connection's status changes nothing
    assert c.spoke(A, 1009) == 3.5 and c.unattended_s(1009) is None  # back in time
    assert c.tick(1014.6) == "silent"
    # then its connection is found dead: the grace goes on from the silence, not from now
    assert c.ended(A, 1020, cut=True, why="timed out") == "unattended"
    assert c.tick(1024.5) is None and c.tick(1024.6) == "expired"


def test_a_resume_takes_the_trace_from_a_dead_or_silent_owner():
    c = Custody(grace=10)
    c.take(A, 0)
    c.spoke(A, 0, heartbeat=5)
    assert c.tick(6) == "silent"
    assert c.take(B, 7) is A and c.unattended_s(7) is None and c.heartbeat is None
    assert c.ended(A, 8, cut=True, why="closed by the takeover") is None  # the old one no longer holds it
    assert c.tick(100) is None


@pytest.mark.parametrize("ended, cut", [
    (None, False), (PeerClosed("x closed the connection"), False), (ProtocolError("bad tag"), False),
    (TimeoutError(errno.ETIMEDOUT, "Connection timed out"), True), (ConnectionResetError(), True),
    (OSError(errno.EHOSTUNREACH, "No route to host"), True)])
def test_what_counts_as_a_cut(ended, cut):
    assert is_cut(ended) is cut


def test_the_backoff_is_bounded_and_an_answer_resets_it():
    r = Reach(grace=60, last_ok=100)
    waits = []
    for now in range(110, 200, 10):
        r.failed(now, "timed out")
        waits.append(r.next_try - now)
    assert waits[0] == RETRY_S and max(waits) == RETRY_MAX_S and waits == sorted(waits)
    assert r.since == 110 and r.due(200) and not r.due(r.next_try - 0.1)
    assert r.ok(205) == 95 and r.since is None and r.wait == RETRY_S and r.ok(206) is None


def test_a_host_is_given_up_only_once_the_agent_must_have_stopped():
    r = Reach(grace=60, last_ok=100)
    r.failed(110, "timed out")
    assert r.lost_at == 100 + HEARTBEAT_S + 60 + LOST_MARGIN_S
    assert not r.given_up(r.lost_at - 0.1) and r.given_up(r.lost_at)
    old = Reach(grace=None, last_ok=100)  # an agent that keeps no grace: lost at the first failure
    old.failed(110, "timed out")
    assert old.given_up(110)


def _refused(code):
    e = PeerUnreachableError("cannot connect")
    e.errno = code
    return e


@pytest.mark.parametrize("e, gone", [
    (PeerClosed("closed"), True), (BrokenPipeError(), True), (RemoteError("trace t does not run"), True),
    (_refused(errno.ECONNREFUSED), True), (_refused(errno.ENOENT), True),
    (TimeoutError("timed out"), False), (ConnectionResetError(), False), (_refused(errno.ETIMEDOUT), False),
    (_refused(errno.EHOSTUNREACH), False),
    (AuthError("the agent at x closed the connection during authentication (wrong key?)"), False),
    (AuthError("the agent at x refused our key (authentication failed)"), True)])
def test_what_says_the_agent_is_gone_rather_than_the_line(e, gone):
    assert Dispatcher._agent_gone(e) is gone


def test_an_unreachable_host_is_said_once_shown_in_the_view_and_lost_past_the_grace():
    import io

    from rich.console import Console

    out = io.StringIO()
    h = HostRun("hv1", "unix:/x", {}, started={"trace": "t", "run": "r"},
                reach=Reach(grace=5, last_ok=time.monotonic()))
    d = Dispatcher([h], b"k" * 32, out=out)
    d._unreachable(h, TimeoutError("timed out"))
    d._unreachable(h, TimeoutError("timed out"))
    said = out.getvalue().strip().splitlines()
    assert said == [said[0]] and "host hv1: agent unreachable (timed out); its trace runs on" in said[0], said
    console = Console(file=io.StringIO(), width=160)
    console.print(d.progress_table())
    assert "agent unreachable (since" in console.file.getvalue()
    h.reach.since, h.reach.last_ok = -100, -100  # long ago: past the grace
    d._unreachable(h, TimeoutError("timed out"))
    assert h.failed.startswith("unreachable for") and "past the agent's grace of 5 s" in h.failed
    assert "hv1: agent lost (unreachable for" in out.getvalue()


class FakeKernelTrace:
    """Stands in for AgentTrace (no eBPF here): a trace that runs until stopped."""

    def __init__(self, package, *_):
        self.name, self.run, self.unavailable, self.stopped = package["trace"], "r1", [], 0
        self.trace = type("T", (), {"skipped": []})()

    def hooks(self):
        return []

    def status(self):
        return {"trace": self.name, "running": not self.stopped}

    def stop(self):
        self.stopped += 1
        return {"running": False, "delivered": True, "read": 7}


@pytest.fixture
def fake_agent(tmp_path, monkeypatch):
    import threading

    import vnet.agent.agent as agent_mod
    from vnet.protocol.server import Server

    monkeypatch.setattr(agent_mod, "AgentTrace", FakeKernelTrace)
    monkeypatch.setattr(agent_mod, "WATCH_S", 0.05)
    key = bytes(range(32))
    agent = agent_mod.Agent(key, tmp_path / "spool", "h", orphan_grace=0.6)
    server = Server(f"unix:{tmp_path}/a.sock", key, "agent", agent.handle)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield agent, f"unix:{tmp_path}/a.sock", key
    agent.shutdown()
    server.stop()
    thread.join(timeout=5)


PACKAGE = {"trace": "t", "collector": {"address": "unix:/nowhere"}}


def test_a_silent_dispatcher_leaves_the_trace_unattended_a_resume_takes_it_back(fake_agent):
    from vnet.protocol import connect

    agent, address, key = fake_agent
    first = connect(address, key, "agent")
    started = first.request({"type": "start", "package": PACKAGE, "heartbeat_s": 1}, ("started",))
    assert (started["run"], started["orphan_grace_s"]) == ("r1", 0.6)
    deadline = time.monotonic() + 5
    while agent.custody.since is None and time.monotonic() < deadline:  # silent past 1 s
        time.sleep(0.05)
    assert agent.custody.since is not None and not agent.current.stopped
    second = connect(address, key, "agent")
    with pytest.raises(RemoteError, match="already running trace t"):
        second.request({"type": "resume", "trace": "t", "run": "other"}, ("resumed",))
    resumed = second.request({"type": "resume", "trace": "t", "run": "r1", "heartbeat_s": 5}, ("resumed",))
    assert resumed["unattended_s"] > 0 and agent.custody.owner is not None and agent.custody.since is None
    with pytest.raises((ConnectionError, OSError)):  # the old connection was closed by the takeover
        first.request({"type": "status"}, ("status",))
    assert second.request({"type": "stop"}, ("stopped",))["read"] == 7
    second.close()
    first.close()


def test_past_the_grace_the_agent_stops_the_trace_and_a_late_resume_hears_it_is_gone(fake_agent):
    from vnet.protocol import connect

    agent, address, key = fake_agent
    first = connect(address, key, "agent")
    first.request({"type": "start", "package": PACKAGE, "heartbeat_s": 1}, ("started",))
    trace = agent.current
    deadline = time.monotonic() + 10
    while agent.current is not None and time.monotonic() < deadline:  # 1 s silence + 0.6 s grace
        time.sleep(0.05)
    assert agent.current is None and trace.stopped == 1
    late = connect(address, key, "agent")
    gone = late.request({"type": "resume", "trace": "t", "run": "r1"}, ("resumed", "gone"))
    assert gone["type"] == "gone" and "no dispatcher for 1 s" in gone["why"] and gone["read"] == 7
    assert late.request({"type": "start", "package": PACKAGE}, ("started",))  # free for the next trace
    late.close()  # an orderly end: the agent stops that one at once
    deadline = time.monotonic() + 5
    while agent.current is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.current is None
    first.close()
