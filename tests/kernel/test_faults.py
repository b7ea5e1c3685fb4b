"""Faults mid-trace (issue 11, docs/reliability.md): the line between agent and collector
cut for 30 s, the collector's disk full, the agent killed with SIGKILL and restarted, an
attach that fails after others succeeded. Real agent, collector and dispatcher processes,
real eBPF, real packets; the fault is real too (a tcx program that drops every packet on the
collector's link, a tmpfs that fills, kill -9, an fd limit). Afterwards every event the
kernel handed to the agent is in the collector's files or accounted for, by stage, and
nothing of vnet stays attached."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kernel_support import (VnetProcess, assert_nothing_on, new_orphans, tc_filters, udp_stream, veth_pair,
                            vnet_snapshot, wait_until)
from vnet.collector.tracefile import TraceFileReader
from vnet.protocol import connect, load_key, new_key

PORT = 5099
COLLECTOR_PORT = 7979


# -- the rig -------------------------------------------------------------------------------------------

def _agent(ns: str, sock: Path, key: Path, spool: Path, host: str, *extra: str) -> VnetProcess:
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "vnet", "agent", "--listen", f"unix:{sock}",
            "--key", str(key), "--spool", str(spool), "--host", host, *extra]
    p = VnetProcess(argv=argv)
    p.wait_stderr("agent listening on", timeout=20)
    return p


def _collector(listen: str, key: Path, out: Path, ns: str | None = None) -> VnetProcess:
    args = ["collect", "--listen", listen, "--key", str(key), "--out", str(out)]
    if not listen.startswith("unix:"):
        args.append("--allow-remote")
    p = VnetProcess(argv=(["ip", "netns", "exec", ns] if ns else []) + [sys.executable, "-m", "vnet", *args])
    p.wait_stderr("collector listening on", timeout=20)
    return p


def _spec(path: Path, net, agent_sock: Path, collector: str, key: Path, name: str, duration: float = 600) -> Path:
    path.write_text(f"""
[trace]
name = "{name}"
duration = {duration}
record = "events"

[collector]
address = "{collector}"
key = "{key}"

[filter]
expression = "udp and dst port {PORT}"

[[host]]
name = "h1"
agent = "unix:{agent_sock}"
interfaces = ["{net.if1}"]
direction = "egress"
""")
    return path


def _dispatch(spec: Path) -> VnetProcess:
    p = VnetProcess("dispatch", str(spec), "--json", "-q")
    p.wait_stderr("h1: tracing", timeout=30)
    return p


def _stop_dispatch(d: VnetProcess, timeout: float = 90) -> dict:
    d.signal(signal.SIGINT)  # as Ctrl-C: stop, flush, report
    assert d.wait(timeout=timeout) == 0, "\n".join(d.stderr)
    return json.loads(d.stdout[-1])


def _agent_status(sock: Path, key: Path) -> dict:
    ch = connect(f"unix:{sock}", load_key(key), "agent")
    try:
        return ch.request({"type": "status"}, ("status",))
    finally:
        ch.close()


def _files(out: Path, trace: str, host: str = "h1") -> list[Path]:
    return sorted((out / trace).glob(f"{host}.vnt*"))


def _read(out: Path, trace: str) -> tuple[list[dict], list[dict], list[TraceFileReader]]:
    """Every event and every chunk (but the records) of host h1's files, and their readers."""
    events, chunks, readers = [], [], []
    for path in _files(out, trace):
        r = TraceFileReader(path)
        events += list(r.events())
        chunks += [{k: v for k, v in c.items() if k != "records"} for c in r.chunks()]
        readers.append(r)
    return events, chunks, readers


def _ours(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("dport") == PORT and e.get("proto") == "udp"]


def _assert_continuous(chunks: list[dict]) -> None:
    """The agent's chunks 0..N each once, no gap recorded."""
    seqs = [c["seq"] for c in chunks if c["kind"] in ("events", "stats", "end", "dropped")]
    assert seqs == list(range(len(seqs))), seqs
    assert not [c for c in chunks if c["kind"] == "gap"]


@contextlib.contextmanager
def _blackhole(ns: str, ifname: str):
    """Every packet in and out of ns/ifname dropped without a word (no RST, no ICMP, the
    link stays up): a tcx program returning TC_ACT_SHOT on both sides. tc's own classifiers
    (matchall, u32) are not built into this kernel; the links go with their fds."""
    from vnet import netns
    from vnet.binding.libbpf import ffi
    from vnet.binding.libbpf import lib as libbpf
    from vnet.binding.object import BPF_TCX_EGRESS, BPF_TCX_INGRESS

    shot = bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]) + bytes([0x95, 0, 0, 0, 0, 0, 0, 0])  # r0 = TC_ACT_SHOT; exit
    insns = ffi.new("char[]", shot)
    lib = libbpf()
    fd = lib.bpf_prog_load(3, b"fault_drop", b"GPL", insns, 2, ffi.NULL)  # BPF_PROG_TYPE_SCHED_CLS
    assert fd >= 0, f"bpf_prog_load: {fd}"
    links = []
    try:
        with netns.enter(ns):
            ifindex = socket.if_nametoindex(ifname)
            for where in (BPF_TCX_INGRESS, BPF_TCX_EGRESS):
                link = lib.bpf_link_create(fd, ifindex, where, ffi.NULL)
                assert link >= 0, f"bpf_link_create: {link}"
                links.append(link)
        yield
    finally:
        for link in links:
            os.close(link)
        os.close(fd)


@pytest.fixture
def two_links(tmp_path):
    """ns1 (the agent; traffic to ns2 over ifA/ifB) and the collector's own namespace
    behind a second veth pair from ns1 (ifC/ifD): the cut is on that line only."""
    key = new_key(tmp_path / "key")
    with veth_pair(93) as net:
        nsc = net.topo.add_netns("c")
        ifc, ifd = net.topo.add_veth_pair("ifC", net.ns1, "ifD", nsc)
        net.topo.add_address(ifc, net.ns1, "10.198.93.1/24")
        net.topo.add_address(ifd, nsc, "10.198.93.2/24")
        yield net, key, nsc, ifd, tmp_path


# -- 1. the line cut for 30 s ------------------------------------------------------------------------------

def test_line_to_the_collector_cut_for_30_s_loses_nothing(two_links):
    """Packets between agent and collector silently dropped for 30 s while events flow: the
    agent notices (no ack, no ping), queues, retries with a bounded back-off, reconnects by
    itself when the line is back, and the collector ends up with every event the kernel
    handed to the agent, each chunk once, in order."""
    net, key, nsc, ifd, tmp = two_links
    address = f"10.198.93.2:{COLLECTOR_PORT}"
    col = _collector(address, key, tmp / "out", ns=nsc)
    agent = _agent(net.ns1, tmp / "a.sock", key, tmp / "spool", "h1")
    d = None
    try:
        d = _dispatch(_spec(tmp / "spec.toml", net, tmp / "a.sock", address, key, "cut"))
        with udp_stream(net.ns1, net.ip2, PORT, interval=0.02) as sent:
            assert wait_until(lambda: _agent_status(tmp / "a.sock", key)["shipper"]["acked"] >= 1, 15)
            with _blackhole(nsc, ifd):
                cut_at = time.monotonic()
                during = wait_until(lambda: (s := _agent_status(tmp / "a.sock", key)["shipper"])["queued"] > 0
                                    and not s["connected"] and s, timeout=25, interval=0.5)
                assert during, "the agent did not notice the cut line"
                time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))
                queued_at_end = _agent_status(tmp / "a.sock", key)["shipper"]["queued"]
            back = wait_until(lambda: (s := _agent_status(tmp / "a.sock", key)["shipper"])["connected"]
                              and s["queued"] == 0 and s, timeout=30, interval=0.2)
            assert back, "the agent did not reconnect and drain by itself"
            time.sleep(1)  # and on as before
        summary = _stop_dispatch(d)
    finally:
        if d is not None:
            d.close()
        agent.close()
        col.close()
    h1 = summary["hosts"]["h1"]
    assert queued_at_end > during["queued"] > 0  # the queue grew while the line was cut ...
    assert h1["shipper"]["reconnects"] >= 2 and h1["shipper"]["queued"] == 0  # ... and drained after
    assert summary["losses"] == {"kernel_ring_full": 0, "agent_unread": 0, "agent_spool_full": 0,
                                 "undelivered_chunks": 0, "undelivered_events": 0}, summary["losses"]
    events, chunks, readers = _read(tmp / "out", "cut")
    assert not any(r.truncated for r in readers)
    _assert_continuous(chunks)
    mine = _ours(events)
    assert len(mine) == sent[0] == h1["read"] == h1["kernel"]["emitted"], (len(mine), sent[0], h1)
    assert len({e["pkt_id"] for e in mine}) == len(mine)  # nothing written twice
    end = [c for c in chunks if c["kind"] == "end"]
    assert len(end) == 1 and end[0]["events"] == len(events)
