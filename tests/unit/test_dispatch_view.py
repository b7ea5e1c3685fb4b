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
