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
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest

from kernel_support import (VnetProcess, assert_nothing_on, has_clsact, new_orphans, on_cpu, start_agent,
                            start_collector, tc_filters, udp_stream, veth_pair, vnet_snapshot, wait_until)
from vnet.collector.tracefile import TraceFileReader
from vnet.protocol import connect, load_key, new_key
from vnet.topology import send_udp

PORT = 5099
COLLECTOR_PORT = 7979


# -- the rig -------------------------------------------------------------------------------------------

def _spec(path: Path, net, agent_sock: Path | str, collector: str, key: Path, name: str,
          duration: float = 600) -> Path:
    """The rig's spec; `agent_sock`: the agent's unix socket, or its address as a string."""
    agent = agent_sock if isinstance(agent_sock, str) else f"unix:{agent_sock}"
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
agent = "{agent}"
interfaces = ["{net.if1}"]
direction = "egress"
""")
    return path


def _dispatch(spec: Path, ns: str | None = None) -> VnetProcess:
    """`vnet dispatch SPEC` (in netns `ns`), once its host traces."""
    argv = [sys.executable, "-m", "vnet", "dispatch", str(spec), "--json", "-q"]
    p = VnetProcess(argv=["ip", "netns", "exec", ns, *argv] if ns else argv)
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


def _close_all(*things) -> None:
    """The test's dispatcher, agent, collector (or channel): each closed (killed if still
    running), those never started (None) skipped."""
    for thing in things:
        if thing is not None:
            thing.close()


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


def _assert_every_packet_in_the_files_once(summary: dict, out: Path, trace: str, sent: int) -> list[dict]:
    """Nothing lost at any stage: each of the `sent` packets is in h1's files once, and its
    chunks follow each other without a gap. The chunks."""
    h1 = summary["hosts"]["h1"]
    assert summary["losses"] == {"kernel_ring_full": 0, "agent_unread": 0, "agent_spool_full": 0,
                                 "undelivered_chunks": 0, "undelivered_events": 0}, summary["losses"]
    events, chunks, readers = _read(out, trace)
    assert not any(r.truncated for r in readers)
    _assert_continuous(chunks)
    mine = _ours(events)
    assert len(mine) == sent == h1["read"] == h1["kernel"]["emitted"], (len(mine), sent, h1)
    assert len({e["pkt_id"] for e in mine}) == len(mine)  # nothing written twice
    return chunks


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


@contextlib.contextmanager
def _second_line(tmp_path: Path, subnet: int, name: str, prefix: str):
    """A veth pair ns1 <-> ns2 (the traced traffic) and a second line from ns1/ifC (PREFIX.1) to
    the namespace `name`/ifD (PREFIX.2), the one a test cuts: (net, key, that ns, ifD, tmp_path)."""
    key = new_key(tmp_path / "key")
    with veth_pair(subnet) as net:
        other = net.topo.add_netns(name)
        ifc, ifd = net.topo.add_veth_pair("ifC", net.ns1, "ifD", other)
        net.topo.add_address(ifc, net.ns1, f"{prefix}.1/24")
        net.topo.add_address(ifd, other, f"{prefix}.2/24")
        yield net, key, other, ifd, tmp_path


@pytest.fixture
def two_links(tmp_path):
    """ns1 (the agent; traffic to ns2 over ifA/ifB) and the collector's own namespace
    behind a second veth pair from ns1 (ifC/ifD): the cut is on that line only."""
    with _second_line(tmp_path, 93, "c", "10.198.93") as rig:
        yield rig


# -- 1. the line cut for 30 s ------------------------------------------------------------------------------

def test_line_to_the_collector_cut_for_30_s_loses_nothing(two_links):
    """Packets between agent and collector silently dropped for 30 s while events flow: the
    agent notices (no ack, no ping), queues, retries with a bounded back-off, reconnects by
    itself when the line is back, and the collector ends up with every event the kernel
    handed to the agent, each chunk once, in order."""
    net, key, nsc, ifd, tmp = two_links
    address = f"10.198.93.2:{COLLECTOR_PORT}"
    col = start_collector(address, key, tmp / "out", ns=nsc)
    agent = start_agent(net.ns1, tmp / "a.sock", key, tmp / "spool", "h1")
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
                noticed = time.monotonic() - cut_at
                time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))
                queued_at_end = _agent_status(tmp / "a.sock", key)["shipper"]["queued"]
                restored_at = time.monotonic()
            back = wait_until(lambda: (s := _agent_status(tmp / "a.sock", key)["shipper"])["connected"]
                              and s["queued"] == 0 and s, timeout=30, interval=0.2)
            assert back, "the agent did not reconnect and drain by itself"
            print(f"cut: noticed after {noticed:.1f} s; {queued_at_end} chunks queued at 30 s; reconnected and "
                  f"drained {time.monotonic() - restored_at:.1f} s after the line came back")
            time.sleep(1)  # and on as before
        summary = _stop_dispatch(d)
    finally:
        _close_all(d, agent, col)
    h1 = summary["hosts"]["h1"]
    assert queued_at_end > during["queued"] > 0  # the queue grew while the line was cut ...
    assert h1["shipper"]["reconnects"] >= 2 and h1["shipper"]["queued"] == 0  # ... and drained after
    chunks = _assert_every_packet_in_the_files_once(summary, tmp / "out", "cut", sent[0])
    end = [c for c in chunks if c["kind"] == "end"]
    assert len(end) == 1 and end[0]["events"] == len(_read(tmp / "out", "cut")[0])  # its count: every event


# -- 2. the collector's disk full ---------------------------------------------------------------------------

@contextlib.contextmanager
def _tmpfs(path: Path, size: str = "8m"):
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, timeout=10)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=10)


def _fill(directory: Path) -> Path:
    """Write a file into `directory` until the file system says it is full."""
    filler = directory / "filler"
    block = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
    return filler


@pytest.fixture
def one_host(tmp_path):
    key = new_key(tmp_path / "key")
    with veth_pair(94) as net, _tmpfs(tmp_path / "out") as out:
        col = start_collector(f"unix:{tmp_path}/col.sock", key, out)
        agent = start_agent(net.ns1, tmp_path / "a.sock", key, tmp_path / "spool", "h1")
        try:
            yield net, key, col, agent, out, tmp_path
        finally:
            _close_all(agent, col)


def _fill_and_wait_refused(out: Path, sock: Path, key: Path) -> tuple[Path, dict]:
    filler = _fill(out)
    full = wait_until(lambda: (s := _agent_status(sock, key)["shipper"])["collector_full"] and s, timeout=20,
                      interval=0.2)
    assert full, "the agent was not told that the collector cannot write"
    assert "No space left" in full["collector_full"], full
    return filler, full


def _assert_readable(out: Path, trace: str) -> None:
    """Every file reads to its end: the chunk that did not fit was cut off, not left torn."""
    for path in _files(out, trace):
        r = TraceFileReader(path)
        for _ in r.chunks():
            pass
        assert not r.truncated, r.problem


def test_collector_disk_full_then_freed_loses_nothing(one_host):
    """The collector's file system fills mid-trace: it does not acknowledge what it cannot
    write, says why, keeps its files readable and neither crashes nor spins; the agent keeps
    the chunks (queue, then spool) and sends them again with a bounded back-off; once space
    is freed everything arrives, each chunk once, and the collector's summary says how long
    writing failed."""
    net, key, col, agent, out, tmp = one_host
    d = _dispatch(_spec(tmp / "spec.toml", net, tmp / "a.sock", f"unix:{tmp}/col.sock", key, "full"))
    try:
        with udp_stream(net.ns1, net.ip2, PORT, interval=0.01) as sent:
            assert wait_until(lambda: _agent_status(tmp / "a.sock", key)["shipper"]["acked"] >= 1, 15)
            filler, full = _fill_and_wait_refused(out, tmp / "a.sock", key)
            time.sleep(6)
            held = _agent_status(tmp / "a.sock", key)["shipper"]
            assert col.proc.poll() is None, "\n".join(col.stderr)
            _assert_readable(out, "full")
            assert held["queued"] > full["queued"] > 0 and held["queued_events"] > 0  # kept, not lost
            assert held["full_refusals"] <= 12, held  # retried with a back-off, not in a loop
            filler.unlink()
            back = wait_until(lambda: not (s := _agent_status(tmp / "a.sock", key)["shipper"])["collector_full"]
                              and s["queued"] == 0 and s, timeout=20, interval=0.2)
            assert back, "the agent did not deliver what it kept once space was back"
            time.sleep(0.5)
        summary = _stop_dispatch(d)
    finally:
        d.close()
    col.signal(signal.SIGTERM)
    col.wait(timeout=20)
    line = next(ln for ln in col.stderr if "vnet: collector: full/h1:" in ln)
    print(line)
    assert "could not write for" in line and "chunks refused and kept by the agent" in line, line
    assert "STILL FAILING" not in line
    h1 = summary["hosts"]["h1"]
    assert summary["losses"] == {"kernel_ring_full": 0, "agent_unread": 0, "agent_spool_full": 0,
                                 "undelivered_chunks": 0, "undelivered_events": 0}, summary["losses"]
    assert h1["delivered"] and h1["shipper"]["full_refusals"] >= 1
    events, chunks, readers = _read(out, "full")
    _assert_continuous(chunks)
    mine = _ours(events)
    assert len(mine) == sent[0] == h1["read"] == h1["kernel"]["emitted"], (len(mine), sent[0])
    assert len({e["pkt_id"] for e in mine}) == len(mine)


def test_collector_disk_still_full_at_stop_counts_exactly_and_delivers_later(one_host):
    """Still full when the trace stops: the summary counts exactly the events not at the
    collector (stage undelivered_events, with the reason); the agent keeps them in its spool
    and goes on sending in the background, so once space is freed they arrive after all."""
    net, key, col, agent, out, tmp = one_host
    d = _dispatch(_spec(tmp / "spec.toml", net, tmp / "a.sock", f"unix:{tmp}/col.sock", key, "stillfull"))
    try:
        with udp_stream(net.ns1, net.ip2, PORT, interval=0.01) as sent:
            assert wait_until(lambda: _agent_status(tmp / "a.sock", key)["shipper"]["acked"] >= 1, 15)
            filler, _ = _fill_and_wait_refused(out, tmp / "a.sock", key)
            time.sleep(2)
        summary = _stop_dispatch(d)
    finally:
        d.close()
    h1 = summary["hosts"]["h1"]
    assert not h1["delivered"] and "No space left" in h1["shipper"]["collector_full"]
    written = len(_ours(_read(out, "stillfull")[0]))
    assert h1["undelivered_events"] > 0 and written + h1["undelivered_events"] == h1["read"] == sent[0]
    assert summary["losses"]["undelivered_events"] == h1["undelivered_events"]
    assert any("NOT all chunks acknowledged" in ln and "No space left" in ln for ln in d.stderr), d.stderr
    kept = Path(h1["kept_in"])
    assert len(list(kept.glob("chunk-*"))) == h1["undelivered_chunks"]
    filler.unlink()
    assert wait_until(lambda: _agent_status(tmp / "a.sock", key)["background"] == [], timeout=30, interval=0.3)
    assert not kept.exists()  # delivered: the spool folder is gone
    events, chunks, _ = _read(out, "stillfull")
    _assert_continuous(chunks)
    assert len(_ours(events)) == sent[0]
    assert [c for c in chunks if c["kind"] == "end"]


# -- 2b. the agent's own spool disk full ---------------------------------------------------------------------

SPOOL_TMPFS = "512k"   # the agent's spool file system: full within seconds at this rate (4 KiB a file at least)


def _analyze(files: list[Path]) -> str:
    an = subprocess.run([sys.executable, "-m", "vnet", "analyze", *map(str, files)], capture_output=True, text=True,
                        timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert an.returncode == 0, an.stderr
    return an.stdout + an.stderr


def test_agent_spool_disk_full_counts_every_drop_and_delivers_the_rest(tmp_path):
    """The agent's spool on a tiny tmpfs (--spool-mb far above it, --queue-mb 0 so every chunk
    is spooled) and the collector killed: the spool's disk fills and writes fail with ENOSPC
    before the byte bound. The agent does not crash and keeps tracing; each chunk it cannot
    keep is dropped and counted (agent_spool_full, a `dropped` marker in its place), said once
    in its log, once by the dispatcher, in its status and the dispatcher's summary, in the
    file's end record and by `vnet analyze`. Once the collector is back, everything spooled
    arrives, each chunk once, and no half-written spool file is left or sent:
    files + agent_spool_full + kernel lost == kernel emitted == packets sent."""
    key = new_key(tmp_path / "key")
    sock, csock, out = tmp_path / "a.sock", f"unix:{tmp_path}/col.sock", tmp_path / "out"
    with veth_pair(57) as net, _tmpfs(tmp_path / "spool", SPOOL_TMPFS) as spool:
        before = vnet_snapshot()
        col = start_collector(csock, key, out)
        agent = start_agent(net.ns1, sock, key, spool, "h1", "--queue-mb", "0", "--spool-mb", "1024")
        d = None
        try:
            d = _dispatch(_spec(tmp_path / "spec.toml", net, sock, csock, key, "spoolfull"))
            with udp_stream(net.ns1, net.ip2, PORT, interval=0.005) as sent:
                assert wait_until(lambda: _agent_status(sock, key)["shipper"]["acked"] >= 1, 15)
                col.signal(signal.SIGKILL)  # nothing acknowledged from here: every chunk goes to the spool
                col.wait(timeout=10)
                full = wait_until(lambda: (s := _agent_status(sock, key))["shipper"]["dropped_events"] and s,
                                  timeout=60, interval=0.3)
                assert full, "the spool's disk never filled"
                assert "No space left" in full["shipper"]["spool_full"], full["shipper"]
                assert full["shipper"]["spooled"] > 0  # it took chunks until its disk was full
                time.sleep(3)
                later = _agent_status(sock, key)
                assert agent.proc.poll() is None and later["running"] and later["error"] is None
                assert later["read"] > full["read"]  # it keeps tracing ...
                assert later["shipper"]["dropped_events"] > full["shipper"]["dropped_events"]  # ... and counting
                assert not list(spool.rglob("*.tmp")), "a failed spool write left its file"
                col = start_collector(csock, key, out)
                back = wait_until(lambda: (s := _agent_status(sock, key)["shipper"])["connected"] and s["queued"] == 0
                                  and s, timeout=30, interval=0.2)
                assert back, "the agent did not deliver what it had spooled once the collector was back"
                time.sleep(1)
            summary = _stop_dispatch(d)
        finally:
            _close_all(d, agent, col)
        h1 = summary["hosts"]["h1"]
        dropped = h1["losses"]["agent_spool_full"]
        print(f"spool full: {dropped} of {sent[0]} events dropped in {h1['shipper']['dropped_chunks']} chunks; "
              f"{h1['shipper']['spooled']} chunks spooled")
        assert dropped > 0 and h1["shipper"]["dropped_events"] == dropped
        assert summary["losses"] == {"kernel_ring_full": 0, "agent_unread": 0, "agent_spool_full": dropped,
                                     "undelivered_chunks": 0, "undelivered_events": 0}, summary["losses"]
        assert h1["delivered"]
        events, chunks, readers = _read(out, "spoolfull")
        assert not any(r.truncated or r.bad_chunks for r in readers), [r.problem for r in readers]
        _assert_continuous(chunks)  # each chunk once, the dropped ones as markers: nothing corrupt sent
        assert sum(c["events"] for c in chunks if c["kind"] == "dropped") == dropped
        end = [c for c in chunks if c["kind"] == "end"]
        assert len(end) == 1 and end[0]["losses"]["agent_spool_full"] == dropped
        mine = _ours(events)
        assert len({e["pkt_id"] for e in mine}) == len(mine)
        assert len(mine) + dropped + h1["kernel"]["lost"] == h1["kernel"]["emitted"] == h1["read"] == sent[0], \
            (len(mine), dropped, h1["kernel"], sent[0])
        said = [ln for ln in agent.stderr if "spool full (" in ln]
        assert len(said) == 1 and "No space left" in said[0], said  # once, not per chunk
        assert not [ln for ln in agent.stderr + d.stderr if "Traceback" in ln]
        assert len([ln for ln in d.stderr if "h1: agent spool full (" in ln]) == 1, d.stderr
        assert any(f"agent_spool_full {dropped}" in ln for ln in d.stderr), d.stderr
        assert f"agent_spool_full {dropped}" in _analyze(_files(out, "spoolfull"))
        assert not list(spool.rglob("chunk-*")) and not list(spool.rglob("*.tmp"))
        left = new_orphans(before)
        assert not left.progs and not left.links, f"left attached: {left}"
        assert_nothing_on(net.ns1, net.if1)


# -- 3. the agent killed with SIGKILL and restarted ----------------------------------------------------------

def test_agent_sigkilled_and_restarted_resends_its_spool_and_the_interruption_is_recorded(tmp_path):
    """kill -9 while the collector is away, so that the agent's chunks sit in its disk spool
    (--queue-mb 0): nothing of vnet stays attached; the dispatcher reports the host lost.
    The restarted agent (same spool) resends what was spooled once the collector is back,
    and the collector records that the stream was interrupted; `vnet analyze` says so.
    The events the dead agent had read are all there (the traffic had stopped and been
    spooled before the kill); then the restarted agent traces the same spec again, into a
    new segment (a new run), nothing lost."""
    key = new_key(tmp_path / "key")
    sock, csock, out, spool = tmp_path / "a.sock", f"unix:{tmp_path}/col.sock", tmp_path / "out", tmp_path / "spool"
    with veth_pair(95) as net:
        before = vnet_snapshot()
        col = start_collector(csock, key, out)
        agent = start_agent(net.ns1, sock, key, spool, "h1", "--queue-mb", "0")
        d = None
        try:
            spec = _spec(tmp_path / "spec.toml", net, sock, csock, key, "killed")
            d = _dispatch(spec)
            with udp_stream(net.ns1, net.ip2, PORT, interval=0.01) as sent:
                assert wait_until(lambda: _agent_status(sock, key)["shipper"]["acked"] >= 1, 15)
                col.signal(signal.SIGKILL)  # the collector away: chunks go to the agent's spool
                col.wait(timeout=10)
                time.sleep(1)
            read = wait_until(lambda: (s := _agent_status(sock, key))["read"] == s["kernel"]["emitted"]
                              == sent[0] and s, timeout=10)
            assert read, "the agent did not read every event before the kill"
            spooled = read["shipper"]["queued"]
            assert spooled > 0 and len(list(spool.rglob("chunk-*"))) == spooled
            agent.signal(signal.SIGKILL)
            assert agent.wait(timeout=10) == -signal.SIGKILL
            assert d.wait(timeout=30) == 13 and any("h1: agent lost" in ln for ln in d.stderr), d.stderr
            left = new_orphans(before)
            assert not left.progs and not left.links, f"programs or links outlived the killed agent: {left}"
            assert tc_filters(net.ns1, net.if1, "ingress") == [] and tc_filters(net.ns1, net.if1, "egress") == []

            agent = start_agent(net.ns1, sock, key, spool, "h1", "--queue-mb", "0")
            assert any("resending what a previous agent left" in ln for ln in agent.stderr) or \
                agent.wait_stderr("resending what a previous agent left", timeout=10)
            col = start_collector(csock, key, out)
            assert wait_until(lambda: _agent_status(sock, key)["background"] == [], timeout=30, interval=0.3)
            assert not list(spool.rglob("chunk-*")) and not list(spool.rglob("open"))

            events, chunks, _ = _read(out, "killed")
            assert len(_ours(events)) == sent[0]  # the spooled chunks were resent: nothing missing
            assert len({e["pkt_id"] for e in _ours(events)}) == sent[0]
            assert [c["kind"] for c in chunks if c["kind"] in ("interrupted", "end", "gap")] == ["interrupted"]
            first_run = sent[0]

            d = _dispatch(spec)  # the same spec again: a new run, its own segment
            with udp_stream(net.ns1, net.ip2, PORT, interval=0.01) as sent:
                time.sleep(2)
            summary = _stop_dispatch(d)
        finally:
            _close_all(d, agent, col)
        assert summary["losses"]["undelivered_events"] == 0 and summary["hosts"]["h1"]["read"] == sent[0]
        files = _files(out, "killed")
        runs = {TraceFileReader(p).header["run"] for p in files}
        assert len(files) >= 3 and len(runs) == 2, files  # run 1 (two collector segments), run 2
        events = _read(out, "killed")[0]
        assert len(_ours(events)) == first_run + sent[0]

        an = subprocess.run([sys.executable, "-m", "vnet", "analyze", *map(str, files)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
        assert an.returncode == 0, an.stderr
        text = an.stdout + an.stderr
        assert "the agent died mid-trace" in text and "killed or crashed" in text, text
        assert_nothing_on(net.ns1, net.if1)


KILL_PORT = 5417  # this test's own traffic (its filter names the pair's address too)


def test_a_restarted_agent_removes_the_clsact_filters_its_killed_predecessor_left(tmp_path):
    """Kernels without tcx (VNET_WITHOUT=tcx: the clsact filters Linux < 6.6 gets): a clsact
    filter is no link, so it outlives its agent's SIGKILL and goes on running. The agent
    restarted on that spool removes it, and the clsact qdisc the dead one made, then resends
    what was spooled and has the interruption recorded; a trace afterwards attaches anew."""
    key = new_key(tmp_path / "key")
    sock, csock, out, spool = tmp_path / "a.sock", f"unix:{tmp_path}/col.sock", tmp_path / "out", tmp_path / "spool"
    older = {"VNET_WITHOUT": "tcx"}
    with veth_pair(59) as net:
        before = vnet_snapshot()
        col = start_collector(csock, key, out)
        agent = start_agent(net.ns1, sock, key, spool, "h1", "--queue-mb", "0", env=older)
        d = None
        try:
            spec = _spec(tmp_path / "spec.toml", net, sock, csock, key, "clsact")
            d = _dispatch(spec)
            assert len(tc_filters(net.ns1, net.if1, "egress")) == 1  # a clsact filter (a tcx link is not listed)
            with udp_stream(net.ns1, net.ip2, PORT, interval=0.01):
                assert wait_until(lambda: _agent_status(sock, key)["shipper"]["acked"] >= 1, 15)
                col.signal(signal.SIGKILL)  # the collector away: chunks go to the spool
                col.wait(timeout=10)
                time.sleep(1)
            agent.signal(signal.SIGKILL)
            assert agent.wait(timeout=10) == -signal.SIGKILL
            assert d.wait(timeout=30) == 13
            left = tc_filters(net.ns1, net.if1, "egress")
            assert len(left) == 1 and has_clsact(net.ns1, net.if1), "the filter did not outlive the kill"

            agent = start_agent(net.ns1, sock, key, spool, "h1", "--queue-mb", "0", env=older)
            assert agent.wait_stderr("removed the clsact filter the killed agent left", timeout=10)
            assert_nothing_on(net.ns1, net.if1)
            col = start_collector(csock, key, out)
            assert wait_until(lambda: _agent_status(sock, key)["background"] == [], timeout=30, interval=0.3)
            chunks = _read(out, "clsact")[1]
            assert [c["kind"] for c in chunks if c["kind"] in ("interrupted", "end")] == ["interrupted"]
            leftover = new_orphans(before)
            assert not leftover.progs and not leftover.links, leftover

            d = _dispatch(spec)  # the restarted agent traces the interface anew
            assert len(tc_filters(net.ns1, net.if1, "egress")) == 1
            _stop_dispatch(d)
        finally:
            _close_all(d, agent, col)
        assert_nothing_on(net.ns1, net.if1)


@contextlib.contextmanager
def _bpffs(path: Path):
    """A bpffs of the test's own, mounted before the agents start: `ip netns exec` gives them a
    /sys without /sys/fs/bpf, but copies this mount into their mount namespace."""
    path.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_tmpfs_under_the_queue_file_spools_instead_of_crashing(tmp_path):
    """The queue file is sparse: a tmpfs without room for its pages would kill the agent with
    SIGBUS at the first store through the mapping. Entries are written with pwritev, which says
    ENOSPC instead: on a 1 MiB tmpfs a 4 MiB queue takes what fits there, the rest goes to the
    spool, nothing is dropped, and a successor reads both back in order."""
    from vnet.agent.queuefile import QueueFile
    from vnet.agent.shipper import Shipper

    with _tmpfs(tmp_path / "shm", "1m") as shm:
        q, spool = shm / "t" / "h" / "r1", tmp_path / "spool" / "t" / "h" / "r1"
        shipper = Shipper(f"unix:{tmp_path}/nobody.sock", bytes(32), {"trace": "t", "host": "h", "run": "r1",
                                                                      "header": {}},
                          spool_dir=spool, memory_bytes=4 << 20, queue_dir=q)
        try:
            for i in range(12):  # 12 x 192 KiB: 2.25 MiB
                shipper.put("events", bytes([i]) * (192 << 10), count=1)
            queued = QueueFile.open(q / "queue").entries()
            assert 0 < len(queued) < 12 and shipper.stats.spooled == 12 - len(queued), shipper.stats
            assert shipper.stats.dropped_chunks == 0
            assert [e.seq for e in shipper._queue] == list(range(12))
            assert [bytes(e.load(shipper._qfile)[1][:1]) for e in shipper._queue] == [bytes([i]) for i in range(12)]
        finally:
            shipper._stop.set()
            shipper._thread.join(timeout=5)
            shipper._drop_queue_file()


QUEUE_ON_FULL_TMPFS = r"""
import sys
from pathlib import Path
from vnet.agent.queuefile import QueueFile
q = QueueFile.create(Path(sys.argv[1]), 4 << 20)
chunk, laps = b"q" * (192 << 10), []
for lap in range(4):  # fill, acknowledge everything, fill again: stores on the pages it has, writes past them
    slots = []
    while (slot := q.append(len(slots), b"h", chunk, None)) is not None:
        slots.append(slot)
    assert all(bytes(q.read(s)[1]) == chunk for s in slots)
    laps.append(len(slots))
    q.release(slots[-1])
print(laps)
"""


def test_a_queue_file_on_a_full_tmpfs_refills_the_pages_it_has_and_refuses_the_rest(tmp_path):
    """The queue file stores into pages it has written before and writes (pwritev) only new ones:
    on a 1 MiB tmpfs, filled, emptied and filled again four times, every lap takes what fits
    and is refused the rest (ENOSPC), never SIGBUS (a process of its own: a SIGBUS would be its
    death, not the test run's)."""
    with _tmpfs(tmp_path / "shm", "1m") as shm:
        r = subprocess.run([sys.executable, "-c", QUEUE_ON_FULL_TMPFS, str(shm / "queue")], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert r.returncode == 0, (r.returncode, r.stderr)  # -7: SIGBUS
    laps = json.loads(r.stdout)
    assert len(laps) == 4 and 2 <= laps[0] <= 5 and all(n >= laps[0] - 1 for n in laps), laps


def _queued(qdir: Path) -> list:
    """The entries of the queue files under qdir (a killed agent's memory queue)."""
    from vnet.agent.queuefile import QueueFile

    out = []
    for path in qdir.rglob("queue"):
        q = QueueFile.open(path)
        out += q.entries()
        q.close()
    return out


def _queue_the_rings_first_records(rings: list[str], index: int, qdir: Path, spool: Path, n: int) -> int:
    """Make the dead agent's state that of a kill between queuing a chunk and giving its
    ring space back: the first records (up to `n`: a batch stops at the ring's end) ring
    number `index` holds, also as its next queued chunk (in the queue file, or the spool
    when that is full; with that ring's position after them). Returns their count."""
    from vnet.agent.queuefile import QueueFile
    from vnet.agent.shipper import _SPOOL_HEAD, LOCAL, ring_mark
    from vnet.binding import PinnedMap
    from vnet.binding.ringbatch import RingBatchReader

    spooled = [int(p.name.removeprefix("chunk-")) for p in spool.rglob("chunk-*")]
    seq = max([s.seq for s in _queued(qdir)] + spooled) + 1  # the collector was gone: all unacked
    (path,) = qdir.rglob("queue")
    q = QueueFile.open(path)
    with PinnedMap(rings[index]) as ring:
        reader = RingBatchReader(ring)
        batch = reader.peek(max_records=n)
        head = {"kind": "events", "seq": seq, "count": batch.count}
        ring_end = ring_mark(index, reader.position + batch.nbytes)
        if q.append(seq, msgpack.packb(head, use_bin_type=True), bytes(batch.data), ring_end) is None:
            # the queue is full (the collector is gone): the agent would have spooled it
            (opening,) = spool.rglob("open")
            packed = msgpack.packb({**head, LOCAL: {"ring_end": ring_end}}, use_bin_type=True)
            (opening.parent / f"chunk-{seq:012d}").write_bytes(_SPOOL_HEAD.pack(len(packed)) + packed
                                                               + bytes(batch.data))
        reader.close()  # not consumed: the ring still holds them
    q.close()
    assert 1 <= batch.count <= n, batch
    return batch.count


@pytest.mark.parametrize("queue", ["tmpfs", "heap", "tmpfs-2rings"])
def test_agent_sigkilled_while_events_flow_every_event_is_in_the_files_or_counted_with_its_stage(tmp_path, queue):
    """kill -9 while packets flow, with events at every stage: delivered to the collector,
    queued in the agent's memory (the collector gone, --queue-mb 1), spooled to disk (past
    that megabyte), in the ring unread (the agent stopped with SIGSTOP, then killed).

    tmpfs: the memory queue is a file on tmpfs (--queue-dir, the default's kind) and the ring
    is pinned on bpffs: the restarted agent sends the queued chunks and reads the ring out
    from where the last queued chunk ended, so nothing is lost: the files hold every event
    the kernel emitted, each once, and `vnet analyze` says nothing died.
    heap: --queue-dir unusable, so the queue is the agent's heap: what it held dies, and is
    counted exactly from the kernel counters the agent pinned (frozen as its tcx link went):
    the files + what died = what the kernel emitted = the packets the filter kept.
    tmpfs-2rings: as tmpfs, with two event rings, each CPU's events in its own, while the
    agent is stopped sent from both CPUs: every ring is pinned and read out from where its
    own last queued chunk ended."""
    from vnet.agent import counters

    rings = 2 if queue.endswith("2rings") else 1
    if rings > len(os.sched_getaffinity(0)):
        pytest.skip("needs two CPUs to run on")
    queue = queue.removesuffix("-2rings")
    key = new_key(tmp_path / "key")
    sock, csock, out, spool = tmp_path / "a.sock", f"unix:{tmp_path}/col.sock", tmp_path / "out", tmp_path / "spool"
    qdir = Path(tempfile.mkdtemp(prefix="vnet-test-queue-", dir="/dev/shm")) if queue == "tmpfs" \
        else Path("/proc/vnet-no-queue-here")
    agent_args = ("--queue-mb", "1", "--queue-dir", str(qdir))
    with veth_pair(68) as net, _bpffs(tmp_path / "bpffs") as bpffs:
        pin_dir = bpffs / "vnet"
        agent_args += ("--pin-dir", str(pin_dir))
        spec = tmp_path / "spec.toml"
        spec.write_text(f"""
[trace]
name = "killed.flowing"
duration = 600
ring_size = 262144
rings = {rings}

[collector]
address = "{csock}"
key = "{key}"

[filter]
expression = "udp and dst port {KILL_PORT} and dst host {net.ip2}"

[[host]]
name = "h1"
agent = "unix:{sock}"
interfaces = ["{net.if1}"]
direction = "egress"
""")
        before = vnet_snapshot()
        col = start_collector(csock, key, out)
        agent = start_agent(net.ns1, sock, key, spool, "h1", *agent_args)
        d = None
        try:
            d = _dispatch(spec)
            (opening,) = spool.rglob("open")
            pinned = msgpack.unpackb(opening.read_bytes(), raw=False)["pinned"]
            assert len(pinned["rings"]) == rings and pinned["ring"] == pinned["rings"][0]
            assert sorted(str(p) for p in pin_dir.iterdir()) == sorted([pinned["path"], *pinned["rings"]])
            assert pinned["hooks"] == ["tcx"]
            with udp_stream(net.ns1, net.ip2, KILL_PORT, interval=0.01):  # flowing until after the kill
                assert wait_until(lambda: _agent_status(sock, key)["shipper"]["acked"] >= 1, 15)
                col.signal(signal.SIGKILL)  # from here on chunks queue: memory (1 MiB), then the spool
                col.wait(timeout=10)

                def spooling() -> bool:
                    send_udp(net.ns1, net.ip2, KILL_PORT, count=500)
                    time.sleep(0.05)  # the ring (256 KiB, ~2,000 events) is drained between bursts
                    return _agent_status(sock, key)["shipper"]["spooled"] >= 3
                assert wait_until(spooling, 60, interval=0.05), "the agent's memory queue never filled"
                last = _agent_status(sock, key)
                agent.signal(signal.SIGSTOP)  # it reads nothing more: what comes stays in its ring
                for cpu in sorted(os.sched_getaffinity(0))[:rings]:  # each CPU's events in its ring
                    with on_cpu(cpu):
                        send_udp(net.ns1, net.ip2, KILL_PORT, count=600 // rings)  # fewer than a ring holds
                time.sleep(0.5)
                agent.signal(signal.SIGKILL)
                assert agent.wait(timeout=10) == -signal.SIGKILL
                time.sleep(0.3)
            assert d.wait(timeout=60) == 13 and any("h1: agent lost" in ln for ln in d.stderr), d.stderr
            left = new_orphans(before)
            assert not left.progs and not left.links, f"programs or links outlived the killed agent: {left}"
            assert tc_filters(net.ns1, net.if1, "ingress") == [] and tc_filters(net.ns1, net.if1, "egress") == []
            at_death, why = counters.read(pinned)
            assert at_death is not None, why
            send_udp(net.ns1, net.ip2, KILL_PORT, count=100)
            assert counters.read(pinned)[0] == at_death  # frozen: nothing counts after the death
            emitted_after_stop = at_death["emitted"] - last["kernel"]["emitted"]
            assert emitted_after_stop > 0 and at_death["lost"] == 0, (last, at_death)
            by_hand = 0
            if queue == "tmpfs":  # the memory queue's chunks outlived the agent
                assert _queued(qdir), "no chunk in the queue file at the kill"
                # with two rings, the second's: its chunks' ring positions name it
                by_hand = _queue_the_rings_first_records(pinned["rings"], rings - 1, qdir, spool, 100)

            agent = start_agent(net.ns1, sock, key, spool, "h1", *agent_args)
            col = start_collector(csock, key, out)
            assert wait_until(lambda: _agent_status(sock, key)["background"] == [], timeout=60, interval=0.3)
            assert not list(spool.rglob("chunk-*")) and not list(spool.rglob("open"))
            assert list(pin_dir.iterdir()) == []  # the pins went once the collector had the counters
            if queue == "tmpfs":
                assert not list(qdir.rglob("*")), list(qdir.rglob("*"))  # the queue file and its folders went
            agent.close()
            read_out = [ln for ln in agent.stderr if "the dead agent had left in its ring" in ln]
            assert len(read_out) == 1, agent.stderr
            from_ring = int(re.search(r"read (\d+) events", read_out[0]).group(1))
            assert from_ring + by_hand >= emitted_after_stop, (read_out, by_hand, emitted_after_stop)
            assert ("bytes it had queued already" in read_out[0]) == (queue == "tmpfs"), read_out
        finally:
            _close_all(d, agent, col)
            if queue == "tmpfs":
                shutil.rmtree(qdir, ignore_errors=True)

        files = _files(out, "killed.flowing")
        events, chunks, readers = _read(out, "killed.flowing")
        ours = [e for e in events if e.get("dport") == KILL_PORT and e.get("dst") == net.ip2]
        assert len(ours) == len(events) == len({e["pkt_id"] for e in events})  # the filter's, each once
        written = sum(c["count"] for c in chunks if c["kind"] == "events")
        assert written == len(events)
        (interrupted,) = [c for c in chunks if c["kind"] == "interrupted"]
        assert interrupted["kernel"] == {**at_death, "frozen": True}, interrupted
        gaps = [c for c in chunks if c["kind"] == "gap"]
        died = at_death["emitted"] - written
        # every packet the filter kept: in the files, died with the agent, or lost to the full ring
        assert written + died + at_death["lost"] == at_death["seen"] - at_death["filtered"]
        assert at_death["seen"] - at_death["filtered"] == at_death["emitted"] + at_death["lost"]
        an = subprocess.run([sys.executable, "-m", "vnet", "analyze", *map(str, files)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
        assert an.returncode == 0, an.stderr
        text = an.stdout + an.stderr
        if queue == "tmpfs":  # nothing lost
            assert died == 0 and not gaps, (died, gaps)
            assert "nothing died with the killed agent" in text, text
        else:  # the heap queue's chunks died with it (a gap), counted; the ring was read out
            assert died > 0 and gaps, (died, gaps)
            assert f"died with the killed agent: {died} events (read from the ring or queued in its memory); " \
                   f"kernel_ring_full {at_death['lost']}" in text, text
        print(f"killed mid-flow ({queue} queue): kernel seen {at_death['seen']}, filtered {at_death['filtered']}, "
              f"emitted {at_death['emitted']}, lost {at_death['lost']}; in the files {written} ({len(readers)} "
              f"segments, {len(gaps)} gap(s)), {from_ring} read out of its ring and {by_hand} queued from it ("
              f"{emitted_after_stop} came while it was stopped), died with the agent {died}")
        assert_nothing_on(net.ns1, net.if1)


# -- 4. an attach failing midway through a multi-probe trace -------------------------------------------------

def _nothing_left(net, before) -> None:
    for ns, ifname in ((net.ns1, net.if1), (net.ns2, net.if2)):
        assert_nothing_on(ns, ifname)
    left = new_orphans(before)
    assert not left.progs and not left.links, f"left attached: {left}"


def test_cli_trace_failing_midway_leaves_nothing_attached(tmp_path):
    """Five hooks (two interfaces both ways, a tracepoint), --strict, under open-file limits
    from too low to enough: each limit fails at a later step (the first object, the devices
    attached then the tracepoint's object, everything attached then the ring's reader). Every
    failure is one line and exit 14 (not a probe 'unavailable', not an internal error), and
    leaves nothing attached; the first limit that suffices traces."""
    root = str(Path(__file__).parents[2])
    with veth_pair(96) as net:
        before = vnet_snapshot()
        failures, ok = [], False
        for limit in range(14, 72):  # every step: each fails at a later one
            proc = subprocess.run(["prlimit", f"--nofile={limit}:{limit}", sys.executable, "-m", "vnet", "trace",
                                   "-i", net.spec1, "-i", net.spec2, "-p", "net:netif_receive_skb", "--strict",
                                   "-c", "1", "--duration", "0.5"],
                                  capture_output=True, text=True, timeout=60, cwd=root,
                                  env={**os.environ, "PYTHONPATH": root})
            if proc.returncode == 0:
                ok = True
                break
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("vnet: error:")]
            assert proc.returncode == 14 and len(errors) == 1, (limit, proc.stderr)
            assert "too many open files" in errors[0].lower() and "ulimit -n" in errors[0], errors
            assert "Traceback" not in proc.stderr
            _nothing_left(net, before)
            failures.append((limit, errors[0], "vnet: tracing" in proc.stderr))
        assert ok, failures
        midway = [f for f in failures if f[2] or "skb_trace" in f[1]]
        assert midway, f"no limit failed after a hook was attached: {failures}"
        _nothing_left(net, before)


def test_agent_trace_failing_midway_leaves_nothing_attached_and_serves_on(tmp_path):
    """The same through an agent: its open-file limit lowered (prlimit on the running agent)
    before each start; a start that fails midway is answered with the error (exit code 14)
    and leaves nothing attached; the agent serves on, and traces once the limit allows."""
    from vnet.dispatch import load

    key = new_key(tmp_path / "key")
    sock = tmp_path / "a.sock"
    with veth_pair(97) as net:
        before = vnet_snapshot()
        col = start_collector(f"unix:{tmp_path}/col.sock", key, tmp_path / "out")
        agent = start_agent(net.ns1, sock, key, tmp_path / "spool", "h1")
        spec = _spec(tmp_path / "spec.toml", net, sock, f"unix:{tmp_path}/col.sock", key, "limits")
        text = spec.read_text().replace(f'interfaces = ["{net.if1}"]', f'interfaces = ["{net.if1}", "lo"]')
        spec.write_text(text.replace('direction = "egress"', 'probes = ["net:netif_receive_skb"]') + "")
        package = dict(load(spec).control_packages()["h1"], strict=True)
        ch = connect(f"unix:{sock}", load_key(key), "agent")
        try:
            ch.request({"type": "hello"}, ("hello",))
            # once with enough descriptors: the features it probes are known from then on, so
            # that the limits below bite while loading and attaching (midway), not while probing
            assert ch.request({"type": "start", "package": package}, ("started",))
            assert ch.request({"type": "stop"}, ("stopped",))["delivered"]
            base = len(os.listdir(f"/proc/{agent.pid}/fd"))
            with open(f"/proc/{agent.pid}/limits") as f:  # the soft limit only: raising a hard one back
                soft = next(ln.split()[3] for ln in f if ln.startswith("Max open files"))  # needs CAP_SYS_RESOURCE
            failures, ok = [], False
            for extra in range(1, 200):  # every step
                subprocess.run(["prlimit", "--pid", str(agent.pid), f"--nofile={base + extra}:"],
                               check=True, timeout=10)
                reply = ch.request({"type": "start", "package": package}, ("started", "error"))
                subprocess.run(["prlimit", "--pid", str(agent.pid), f"--nofile={soft}:"], check=True, timeout=10)
                if reply["type"] == "started":
                    assert len(reply["hooks"]) == 5, reply
                    assert ch.request({"type": "stop"}, ("stopped",))["delivered"]
                    ok = True
                    break
                assert reply["exit_code"] == 14 and "too many open files" in reply["message"].lower(), reply
                _nothing_left(net, before)
                failures.append(reply["message"])
            assert ok and failures, "\n".join(failures)
            assert any("skb_trace" in m or "ring buffer" in m or "share map" in m for m in failures), failures
        finally:
            _close_all(ch, agent, col)
        _nothing_left(net, before)


# -- 5. the line between dispatcher and agent cut ------------------------------------------------------------

AGENT_PORT = 7981


@pytest.fixture
def control_line(tmp_path):
    """The agent in ns1 on TCP, reached by the dispatcher from its own namespace over a second
    veth pair (ns1/ifC <-> d/ifD): the cut is on that line only. The collector is on a unix
    socket, a path no cut touches; the traced traffic runs on ifA/ifB."""
    with _second_line(tmp_path, 58, "d", "10.197.58") as rig:
        yield rig


def _start_tcp_agent(ns: str, key: Path, spool: Path, *extra: str) -> VnetProcess:
    p = VnetProcess(argv=["ip", "netns", "exec", ns, sys.executable, "-m", "vnet", "agent", "--listen",
                          f"10.197.58.1:{AGENT_PORT}", "--allow-remote", "--key", str(key), "--spool", str(spool),
                          "--host", "h1", *extra])
    p.wait_stderr("agent listening on", timeout=20)
    return p


def _tcp_status(ns: str, key: Path) -> dict:
    """The agent's status asked from its own namespace: not over the line that is cut."""
    from vnet import netns

    with netns.enter(ns):
        ch = connect(f"10.197.58.1:{AGENT_PORT}", load_key(key), "agent", timeout=10)
    try:
        return ch.request({"type": "status"}, ("status",))
    finally:
        ch.close()


def test_line_to_the_agent_cut_for_30_s_the_trace_runs_on_and_is_resumed(control_line):
    """Every packet between dispatcher and agent dropped for 30 s mid-trace (the agent's line
    to the collector untouched) while a UDP stream flows: the dispatcher says the host is
    unreachable and keeps retrying; the agent keeps tracing and shipping (its trace unattended
    but within its grace); once the line is back the dispatcher resumes the trace, the stop
    is the usual one (exit 0, complete summary) and every packet sent is in the files."""
    net, key, nsd, ifd, tmp = control_line
    csock = f"unix:{tmp}/col.sock"
    before = vnet_snapshot()
    col = start_collector(csock, key, tmp / "out")
    agent = _start_tcp_agent(net.ns1, key, tmp / "spool")
    d = None
    try:
        d = _dispatch(_spec(tmp / "spec.toml", net, f"10.197.58.1:{AGENT_PORT}", csock, key, "ctlcut"), ns=nsd)
        with udp_stream(net.ns1, net.ip2, PORT, interval=0.02) as sent:
            assert wait_until(lambda: _tcp_status(net.ns1, key)["shipper"]["acked"] >= 1, 15)
            with _blackhole(nsd, ifd):
                cut_at = time.monotonic()
                at_cut = _tcp_status(net.ns1, key)
                d.wait_stderr("h1: agent unreachable", timeout=25)
                noticed = time.monotonic() - cut_at
                unattended = wait_until(lambda: (s := _tcp_status(net.ns1, key))["unattended_s"] is not None and s,
                                        timeout=20, interval=0.5)
                assert unattended, "the agent did not notice its dispatcher was gone"
                agent_noticed = time.monotonic() - cut_at - unattended["unattended_s"]
                time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))
                late = _tcp_status(net.ns1, key)
                assert late["running"] and late["read"] > at_cut["read"]  # traced on ...
                assert late["shipper"]["acked"] > at_cut["shipper"]["acked"]  # ... and shipped on
                restored_at = time.monotonic()
            back = d.wait_stderr("h1: agent reachable again", timeout=30)
            resumed = time.monotonic() - restored_at
            assert wait_until(lambda: _tcp_status(net.ns1, key)["unattended_s"] is None, timeout=10)
            time.sleep(2)
        print(f"control line cut 30 s: dispatcher said unreachable after {noticed:.1f} s, the agent noticed after "
              f"{agent_noticed:.1f} s; resumed {resumed:.1f} s after the line came back ({back})")
        summary = _stop_dispatch(d)
    finally:
        _close_all(d, agent, col)
    assert not [ln for ln in d.stderr if "agent lost" in ln or "Traceback" in ln], d.stderr
    assert [ln for ln in agent.stderr if "resumed trace ctlcut" in ln], agent.stderr
    h1 = summary["hosts"]["h1"]
    assert summary["failed"] == {} and h1["delivered"]
    chunks = _assert_every_packet_in_the_files_once(summary, tmp / "out", "ctlcut", sent[0])
    assert [c for c in chunks if c["kind"] == "end"]
    left = new_orphans(before)
    assert not left.progs and not left.links, f"left attached: {left}"
    assert_nothing_on(net.ns1, net.if1)


def test_line_to_the_agent_cut_past_its_grace_the_agent_stops_the_trace_itself(control_line):
    """A cut longer than the agent's --orphan-grace (5 s here): the agent notices the silence
    (past the dispatcher's 5 s heartbeat), runs the trace for its grace, then stops it by
    itself: nothing stays attached, what it traced is in the files with its end record, lost
    0. The dispatcher gives the host up once that grace must be over: exit 13, `agent lost`."""
    net, key, nsd, ifd, tmp = control_line
    csock = f"unix:{tmp}/col.sock"
    before = vnet_snapshot()
    col = start_collector(csock, key, tmp / "out")
    agent = _start_tcp_agent(net.ns1, key, tmp / "spool", "--orphan-grace", "5")
    d = None
    try:
        d = _dispatch(_spec(tmp / "spec.toml", net, f"10.197.58.1:{AGENT_PORT}", csock, key, "graceover"), ns=nsd)
        with udp_stream(net.ns1, net.ip2, PORT, interval=0.02):
            assert wait_until(lambda: _tcp_status(net.ns1, key)["shipper"]["acked"] >= 1, 15)
            with _blackhole(nsd, ifd):
                cut_at = time.monotonic()
                assert wait_until(lambda: not _tcp_status(net.ns1, key)["running"], timeout=25, interval=0.3), \
                    "the agent did not stop the unattended trace"
                stopped = time.monotonic() - cut_at
                assert d.wait(timeout=30) == 13, "\n".join(d.stderr)
                gave_up = time.monotonic() - cut_at
                assert time.monotonic() - cut_at < 40
    finally:
        _close_all(d, agent, col)
    print(f"cut past a 5 s grace: the agent stopped the trace {stopped:.1f} s after the cut, the dispatcher gave "
          f"the host up after {gave_up:.1f} s")
    assert stopped <= 5 + 5 + 3  # heartbeat + grace + its watch and the stop
    lost = [ln for ln in d.stderr if "h1: agent lost" in ln]
    assert lost and "past the agent's grace of 5 s" in lost[0], d.stderr
    summary = json.loads(d.stdout[-1])
    assert "h1" in summary["failed"]
    assert any("no dispatcher for 5 s" in ln for ln in agent.stderr), agent.stderr
    assert not [ln for ln in agent.stderr + d.stderr if "Traceback" in ln]
    left = new_orphans(before)
    assert not left.progs and not left.links, f"left attached: {left}"
    assert tc_filters(net.ns1, net.if1, "ingress") == [] and tc_filters(net.ns1, net.if1, "egress") == []
    events, chunks, readers = _read(tmp / "out", "graceover")
    assert not any(r.truncated for r in readers)
    _assert_continuous(chunks)
    end = [c for c in chunks if c["kind"] == "end"]
    assert len(end) == 1 and not any(end[0]["losses"].values()), end
    assert len(_ours(events)) == end[0]["events"] == end[0]["kernel"]["emitted"] > 0


def test_a_dispatcher_killed_is_not_a_cut_its_trace_stops_at_once(control_line):
    """kill -9 of the dispatcher: its kernel closes the connection in order (FIN), which no
    network cut produces, and the run it held dies with it: the agent stops the trace at once
    (not after its grace), leaves nothing attached and serves the next dispatcher."""
    net, key, nsd, ifd, tmp = control_line
    csock = f"unix:{tmp}/col.sock"
    before = vnet_snapshot()
    col = start_collector(csock, key, tmp / "out")
    agent = _start_tcp_agent(net.ns1, key, tmp / "spool")  # the default 60 s grace
    spec = _spec(tmp / "spec.toml", net, f"10.197.58.1:{AGENT_PORT}", csock, key, "killeddispatcher")
    d = None
    try:
        d = _dispatch(spec, ns=nsd)
        assert wait_until(lambda: _tcp_status(net.ns1, key)["running"], 10)
        d.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        assert wait_until(lambda: not _tcp_status(net.ns1, key)["running"], timeout=15, interval=0.2)
        stopped = time.monotonic() - killed_at
        assert stopped < 10, stopped  # well inside the 60 s grace
        assert any("left during trace killeddispatcher" in ln and "stopping it" in ln for ln in agent.stderr)
        assert not [ln for ln in agent.stderr if "cut off" in ln]
        left = new_orphans(before)
        assert not left.progs and not left.links, f"left attached: {left}"
        assert tc_filters(net.ns1, net.if1, "egress") == []
        d = _dispatch(spec, ns=nsd)  # the agent serves on
        summary = _stop_dispatch(d)
    finally:
        _close_all(d, agent, col)
    print(f"dispatcher SIGKILLed: its trace stopped {stopped:.1f} s later")
    assert summary["failed"] == {} and summary["hosts"]["h1"]["delivered"]
    end = [c for c in _read(tmp / "out", "killeddispatcher")[1] if c["kind"] == "end"]
    assert len(end) == 2  # the killed run ended properly too
