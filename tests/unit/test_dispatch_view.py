"""The dispatcher's live view and final report from synthetic host states
(pure logic: no agents; the real run is tests/kernel/test_distributed.py)."""

from __future__ import annotations

import io

from rich.console import Console

from vnet.dispatch.dispatcher import Dispatcher, HostRun


def _dispatcher() -> tuple[Dispatcher, io.StringIO]:
    out = io.StringIO()
    a = HostRun("hv1", "unix:/x", {}, status={"kernel": {"lost": 3}, "shipper": {"queued": 2, "connected": True}},
                last_read=1500, rate=250.0, summary={"read": 1500, "chunks": 4, "delivered": True,
                                                     "losses": {"kernel_ring_full": 3, "agent_unread": 0,
                                                                "agent_spool_full": 0}})
    b = HostRun("vm1", "unix:/y", {}, failed="connection reset")
    return Dispatcher([a, b], b"k" * 32, out=out), out


def test_progress_table_shows_every_host():
    d, _ = _dispatcher()
    console = Console(file=io.StringIO(), width=120)
    console.print(d.progress_table())
    text = console.file.getvalue()
    assert "hv1" in text and "250" in text and "1,500" in text and "FAILED" in text


def test_report_counts_losses_by_stage_and_names_failed_hosts():
    d, out = _dispatcher()
    summary = d.report("duration")
    assert summary["losses"]["kernel_ring_full"] == 3 and summary["failed"] == {"vm1": "connection reset"}
    text = out.getvalue()
    assert "vm1: FAILED mid-trace" in text and "kernel_ring_full 3" in text


def test_a_hosts_error_names_it_and_keeps_the_causes_exit_code():
    from vnet.dispatch.dispatcher import HostError, _first_error
    from vnet.errors import NoSuchInterfaceError
    from vnet.protocol.channel import RemoteError

    e = HostError("a", RemoteError("no such interface: eth9 (hint: list interfaces with 'ip link')", 4))
    assert (str(e), e.exit_code) == ("host a: no such interface: eth9 (hint: list interfaces with 'ip link')", 4)
    assert HostError("b", NoSuchInterfaceError("x", hint="y")).hint == "y"
    lost = HostError("c", TimeoutError("timed out"))
    assert (lost.message, lost.exit_code) == ("host c: the agent stopped answering: timed out", 12)
    both = _first_error([e, lost])
    assert (both.message, both.exit_code) == ("host a: no such interface: eth9 (hint: list interfaces with "
                                              "'ip link'); host c: the agent stopped answering: timed out", 4)
    # a peer's exit code is taken only where it can be one
    assert RemoteError("x", 300).exit_code == RemoteError("x", True).exit_code == RemoteError("x").exit_code == 10


def test_outcome_lost_hosts_before_hosts_with_nothing_left():
    assert Dispatcher.outcome({"failed": {}, "ended": {}}) is None
    ended = Dispatcher.outcome({"failed": {}, "ended": {"h1": "every traced interface is gone (a/va)"}})
    assert (str(ended), ended.exit_code) == ("host h1: every traced interface is gone (a/va)", 4)
    assert Dispatcher.outcome({"failed": {"h2": "reset"}, "ended": {"h1": "gone"}}).exit_code == 13


def test_nothing_is_said_before_every_host_traces_unless_it_does():
    d, out = _dispatcher()
    d.hold()
    d.say("vnet: trace t: 2 hosts")
    assert out.getvalue() == ""
    d.release()
    assert out.getvalue() == "vnet: trace t: 2 hosts\n"


def test_a_vanished_interface_is_said_once_per_host():
    d, out = _dispatcher()
    h = d.hosts[0]
    v = {"iface": "ns1/eth0", "why": "deleted", "at_ns": 1_795_640_002_851_332_377, "mono_ns": 1}
    d._gone(h, {"vanished": [v]})
    d._gone(h, {"vanished": [v]})
    assert out.getvalue() == "vnet: host hv1: iface ns1/eth0 vanished at 20:53:22.851 UTC (deleted): its hooks stopped\n"
