"""Device tracing end to end, against the running kernel: real namespaces and veth
pairs, the committed CO-RE object attached with tcx (or clsact), real packets, and
the `vnet` CLI as a real process that is signalled, stopped and killed.

What is proven here:
* DeviceTrace reports every packet exactly once per hook, attributes it to the
  right probe even where ifindexes repeat across namespaces, and gives a packet
  the same pkt_id at both ends of a veth (UDP and TCP).
* `vnet trace` prints exactly -c events, honours --duration and -w, stops
  cleanly on SIGINT/SIGTERM with a summary, and never leaves a program, link or
  filter behind, not even after SIGKILL (tcx) or, with clsact, after a restart.
* Errors are one stderr line with a distinct exit code, and leave nothing loaded.
* A full ring buffer loses events, and every loss is counted and reported.

Needs root (conftest.py skips otherwise), bpftool, tc, ip, ethtool, setpriv.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest

from vnet.errors import AttachError
from vnet.probes import features
from vnet.probes.device import Device, resolve
from vnet.topology import send_udp, tcp_exchange, udp_sink
from vnet.trace import DeviceTrace

from kernel_support import (
    ROOT,
    VNET_TC_HANDLE,
    BpfIds,
    VnetProcess,
    assert_nothing_on,
    bpf_ids_held_by,
    has_clsact,
    new_orphans,
    parse_event_line,
    sh,
    tc_filters,
    udp_stream,
    veth_pair,
    vnet_snapshot,
    wait_released,
    wait_until,
)

pytestmark = pytest.mark.kernel

ETH_IP_UDP = 14 + 20 + 8  # skb->len at a veth's TC hooks includes the Ethernet header
NOBODY = 65534
TCX = features.tcx_expected()  # Linux >= 6.6: tcx links, which die with their process
HOOK = "tcx" if TCX else "clsact"


@pytest.fixture
def net():
    with veth_pair() as pair:
        yield pair


@pytest.fixture
def before():
    """The vnet programs and links that exist before the test (other runs' are not ours)."""
    return vnet_snapshot()


def assert_released(ids, what: str = "the vnet process") -> None:
    assert ids.progs, f"{what} held no BPF program: nothing would be checked"
    left = wait_released(ids, timeout=5.0)
    assert not left.progs and not left.links, f"still in the kernel after {what} exited: {left}"


def assert_no_orphans(before) -> None:
    left = new_orphans(before)
    assert not left.progs and not left.links, f"vnet programs/links left attached: {left}"


def collect(trace: DeviceTrace, want, done, timeout: float = 10.0) -> list[dict]:
    """Poll `trace` until done(matching events) or the deadline; the matching events."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while not done(got) and time.monotonic() < deadline:
        got += [e for e in trace.poll(100) if want(e)]
    return got


# -- API: DeviceTrace ---------------------------------------------------------------------------------------

def test_udp_every_datagram_once_per_hook_with_the_same_pkt_id(net):
    dev1, dev2 = resolve(net.spec1), resolve(net.spec2)
    # Veth peers created in two fresh namespaces usually get the same ifindex in each:
    # then only the probe (which object instance saw it) tells the two ends apart.
    assert dev1.netns == net.ns1 and dev2.netns == net.ns2
    sport, dport, n = 40123, 5301, 100
    payloads = [b"vnet-trace-%03d-" % i + b"x" * (i % 37) for i in range(n)]
    want = lambda e: e["proto"] == "udp" and e["dport"] == dport  # noqa: E731 (MLD etc. may show up too)

    with DeviceTrace([dev1, dev2]) as t, udp_sink(net.ns2, dport) as sink:
        assert {h.kind for h in t.hooks} == {HOOK}
        assert sorted(h.probe for h in t.hooks) == sorted(
            f"dev:{ns}/{ifname}:{d}" for ns, ifname in ((net.ns1, net.if1), (net.ns2, net.if2))
            for d in ("ingress", "egress"))
        send_udp(net.ns1, net.ip2, dport, count=n, payload_fn=payloads.__getitem__, sport=sport)
        events = collect(t, want, lambda got: len(got) >= 2 * n)
        events += [e for e in t.poll(300) if want(e)]  # anything beyond 2n would show up here
        assert sink.received(timeout=5, expect=n) == n
        stats = t.stats()

    by_probe = Counter(e["probe"] for e in events)
    egress, ingress = f"dev:{net.ns1}/{net.if1}:egress", f"dev:{net.ns2}/{net.if2}:ingress"
    assert by_probe == {egress: n, ingress: n}, by_probe
    out = [e for e in events if e["probe"] == egress]
    inn = [e for e in events if e["probe"] == ingress]
    for e in out:
        assert (e["ifname"], e["netns"], e["dir"], e["ifindex"]) == (net.if1, net.ns1, "egress", dev1.ifindex)
    for e in inn:
        assert (e["ifname"], e["netns"], e["dir"], e["ifindex"]) == (net.if2, net.ns2, "ingress", dev2.ifindex)
    for e in events:
        assert (e["src"], e["dst"], e["sport"], e["dport"], e["ip_version"]) == (net.ip1, net.ip2, sport, dport, 4)

    ids_out = {e["pkt_id"] for e in out}
    ids_in = {e["pkt_id"] for e in inn}
    assert len(ids_out) == n and ids_out == ids_in
    # Lengths: every payload once, and the same length at both ends of each packet.
    assert sorted(e["len"] for e in out) == sorted(ETH_IP_UDP + len(p) for p in payloads)
    len_in = {e["pkt_id"]: e["len"] for e in inn}
    ts_in = {e["pkt_id"]: e["ts_ns"] for e in inn}
    for e in out:
        assert len_in[e["pkt_id"]] == e["len"]
        assert ts_in[e["pkt_id"]] >= e["ts_ns"]  # causality, one monotonic clock
    assert stats.lost == 0 and stats.emitted >= 2 * n and stats.seen >= stats.emitted


def test_tcp_segments_keep_their_pkt_id_across_the_veth(net):
    port, nbytes = 6123, 256 << 10
    dev1, dev2 = resolve(net.spec1), resolve(net.spec2)
    want = lambda e: e["proto"] == "tcp" and port in (e["sport"], e["dport"])  # noqa: E731
    a_out, a_in = f"dev:{net.ns1}/{net.if1}:egress", f"dev:{net.ns1}/{net.if1}:ingress"
    b_out, b_in = f"dev:{net.ns2}/{net.if2}:egress", f"dev:{net.ns2}/{net.if2}:ingress"

    def ids(events, probe):
        return Counter(e["pkt_id"] for e in events if e["probe"] == probe)

    def complete(events):  # both directions fully seen at both ends (FIN/ACKs may trail the exchange)
        return ids(events, a_out) == ids(events, b_in) and ids(events, b_out) == ids(events, a_in)

    with DeviceTrace([dev1, dev2]) as t:
        assert tcp_exchange(net.ns1, net.ns2, net.ip2, port, nbytes) == nbytes
        events: list[dict] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            batch = [e for e in t.poll(300) if want(e)]
            events += batch
            if not batch and events and complete(events):
                break
        stats = t.stats()

    assert stats.lost == 0
    assert complete(events), "a segment was seen at one end of the veth only (or with another pkt_id)"
    client_to_server = [e for e in events if e["probe"] == a_out]
    server_to_client = [e for e in events if e["probe"] == b_out]
    data = [e for e in client_to_server if e["len"] > 14 + 20 + 32]  # more than headers with timestamps
    assert sum(1 for e in client_to_server if "S" in e["tcp_flags"]) == 1
    assert len(data) >= nbytes // 1500  # offloads off: one skb per MSS-sized segment
    for e in client_to_server:
        assert (e["src"], e["dst"], e["dport"]) == (net.ip1, net.ip2, port)
    for e in server_to_client:
        assert (e["src"], e["dst"], e["sport"]) == (net.ip2, net.ip1, port)
    for side in (client_to_server, server_to_client):
        segments_of: dict[str, set] = {}
        for e in side:
            segments_of.setdefault(e["pkt_id"], set()).add((e["tcp_seq"], e["tcp_ack"], e["tcp_flags"]))
        # One pkt_id never stands for two different segments (so different seq: different pkt_id).
        assert all(len(s) == 1 for s in segments_of.values()), {k: v for k, v in segments_of.items() if len(v) > 1}
    seqs = {e["tcp_seq"] for e in data}
    assert len(seqs) >= nbytes // 1500 and len({e["pkt_id"] for e in data}) >= len(seqs)


def test_a_device_that_vanished_after_resolve_leaves_nothing_loaded(net):
    """start() attaches the first device, then fails on the second: it rolls everything back."""
    mine = bpf_ids_held_by("self")
    ghost = Device("ghost0", 0x7FFF0, net.ns2, 0)  # resolved once, gone since
    trace = DeviceTrace([resolve(net.spec1), ghost])
    with pytest.raises(AttachError) as err:
        trace.start()
    assert err.value.exit_code == 9 and "ifindex" in str(err.value)
    assert trace.objects == [] and trace.hooks == []
    now = bpf_ids_held_by("self")  # no program, link or map fd left open in this process
    assert not (now.progs - mine.progs) and not (now.links - mine.links) and not (now.maps - mine.maps)
    assert_nothing_on(net.ns1, net.if1)


def test_full_ring_counts_every_loss_and_drains_exactly_what_was_emitted(net):
    n, dport = 2000, 5302
    with DeviceTrace([resolve(net.spec1)], ring_bytes=4096) as t, udp_sink(net.ns2, dport):
        # Nobody polls while sending: the 4 KiB ring fills after a few dozen events. The
        # egress hook runs inside each sendto(), so all n have passed it when this returns
        # (the sink only spares us ICMP errors; a burst overflows its socket buffer).
        send_udp(net.ns1, net.ip2, dport, count=n)

        def stable():
            a = t.stats()
            time.sleep(0.1)
            b = t.stats()
            return b if (a.seen, a.emitted, a.lost) == (b.seen, b.emitted, b.lost) else None

        s = wait_until(stable, timeout=5)
        assert s is not None, "counters kept moving"
        assert s.lost > 0 and s.seen >= n
        assert s.emitted + s.lost == s.seen  # the program counts every packet it sees
        drained = t.drain()
        for _ in range(3):  # a stray packet (ARP refresh) after the drain would be emitted into the freed space
            s = t.stats()
            if len(drained) == s.emitted:
                break
            drained += t.drain()
        assert len(drained) == s.emitted and s.received == s.emitted
        assert s.emitted + s.lost == s.seen
        assert t.drain() == []


# -- CLI: events, counts, outputs ----------------------------------------------------------------------------

def test_cli_count_json_prints_exactly_count_events(net, before):
    with VnetProcess("trace", "-i", net.spec1, "-c", "10", "--json") as p:
        started = p.wait_started()
        assert f"{net.ns1}/{net.if1}:ingress" in started and f"({HOOK})" in started
        ids = p.bpf_ids()
        assert len(ids.progs) == 2 and len(ids.links) == (2 if TCX else 0)  # ingress + egress
        with udp_stream(net.ns1, net.ip2, 5303):
            rc = p.wait(20)
    assert rc == 0, p.stderr
    assert len(p.stdout) == 10
    events = [parse_event_line(ln) for ln in p.stdout]
    assert all(e["probe"].startswith(f"dev:{net.ns1}/{net.if1}:") and e["netns"] == net.ns1 for e in events)
    assert any(e["proto"] == "udp" and e["dport"] == 5303 and e["src"] == net.ip1 for e in events)
    summary = p.summary()
    assert summary["printed"] == 10 and summary["hooks"] == 2 and summary["lost"] == 0
    assert_released(ids)
    assert_nothing_on(net.ns1, net.if1)
    assert_no_orphans(before)


def test_cli_duration_and_write_file(net, before, tmp_path):
    """-w records raw batches to a trace file (the collector's format); -r prints them back."""
    out = tmp_path / "events.vnt"
    with VnetProcess("trace", "-i", net.spec2, "--duration", "1", "-w", str(out)) as p:
        p.wait_started()
        ids = p.bpf_ids()
        send_udp(net.ns1, net.ip2, 5304, count=20)
        rc = p.wait(15)  # it stops by itself; the bound only keeps a hang from blocking the run
    assert rc == 0, p.stderr
    assert p.stdout == []  # -w: no events on stdout
    with VnetProcess("trace", "-r", str(out), "--json") as r:
        assert r.wait(15) == 0, r.stderr
    events = [parse_event_line(ln) for ln in r.stdout]
    ours = [e for e in events if e["proto"] == "udp" and e["dport"] == 5304]
    assert len(ours) == 20 and {e["probe"] for e in ours} == {f"dev:{net.ns2}/{net.if2}:ingress"}
    assert p.summary()["printed"] == len(events)
    assert any(f"{len(events)} events read from 1 file" in ln for ln in r.stderr)
    assert_released(ids)
    assert_no_orphans(before)


def test_cli_write_count_is_exact(net, before, tmp_path):
    out = tmp_path / "five.vnt"
    with VnetProcess("trace", "-i", net.spec2, "-c", "5", "-w", str(out)) as p:
        p.wait_started()
        send_udp(net.ns1, net.ip2, 5306, count=30)
        assert p.wait(15) == 0, p.stderr
    with VnetProcess("trace", "-r", str(out), "--json") as r:
        assert r.wait(15) == 0, r.stderr
    assert len(r.stdout) == 5
    with VnetProcess("trace", "-i", net.spec2, "-w", str(out)) as again:
        assert again.wait(15) == 2 and "exists" in again.stderr[-1]


def resident_pages(path) -> tuple[int, int]:
    """(pages of the file the page cache holds, pages of the file): mincore(2) on a mapping."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw), pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["default", "--page-cache"])
def test_cli_write_goes_around_the_page_cache_unless_asked(net, before, tmp_path, mode):
    """-w writes whole blocks around the page cache (O_DIRECT), as the collector does: the
    reader spends less CPU per event under a flood, CPU the traced path shares with it.
    --page-cache: plain writes. The same events either way; what differs is what the page
    cache holds after. The recorder is stopped while the ring fills, so that it takes the
    20,000 events as one 2.5 MB batch whatever the machine's speed."""
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    if fs in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {fs}: the page cache is its storage")
    n = 20000
    out = tmp_path / "events.vnt"
    with VnetProcess("trace", "-i", net.spec2, "--dport", "5307", "-c", str(n), "-w", str(out),
                     *([mode] if mode != "default" else [])) as p:
        p.wait_started()
        p.signal(signal.SIGSTOP)
        try:
            send_udp(net.ns1, net.ip2, 5307, count=n)
        finally:
            p.signal(signal.SIGCONT)
        assert p.wait(30) == 0, p.stderr
    resident, pages = resident_pages(out)
    assert pages > n * 128 // 4096
    if mode == "default":
        assert resident <= 2, (resident, pages)  # the last partial block, written through it too
    else:
        assert resident == pages
    with VnetProcess("trace", "-r", str(out), "--json") as r:
        assert r.wait(30) == 0, r.stderr
    assert [e["dport"] for e in map(parse_event_line, r.stdout)] == [5307] * n
    assert_no_orphans(before)


def test_cli_write_on_a_file_system_without_direct_io_says_so_with_v(net, before, tmp_path):
    ramfs = tmp_path / "ramfs"
    ramfs.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(ramfs)], check=True, timeout=10)
    try:
        out = ramfs / "events.vnt"
        with VnetProcess("trace", "-v", "-i", net.spec2, "--dport", "5308", "-c", "20", "-w", str(out)) as p:
            p.wait_started()
            send_udp(net.ns1, net.ip2, 5308, count=20)
            assert p.wait(30) == 0, p.stderr
        assert any("no direct I/O on this file system: written through the page cache" in ln for ln in p.stderr)
        with VnetProcess("trace", "-r", str(out), "--json") as r:
            assert r.wait(15) == 0, r.stderr
        assert [e["dport"] for e in map(parse_event_line, r.stdout)] == [5308] * 20
    finally:
        subprocess.run(["umount", "-l", str(ramfs)], check=False, timeout=10)
    assert_no_orphans(before)


@pytest.mark.parametrize("flag", ["--immediate-mode", "--immediate"])
def test_cli_write_in_immediate_mode(net, before, tmp_path, flag):
    """As tcpdump --immediate-mode: each batch written as soon as it is read (tests/kernel/
    test_recorder_pacing.py counts the chunks); every event is in the file."""
    out = tmp_path / "events.vnt"
    with VnetProcess("trace", "-i", net.spec2, "--dport", "5309", "-c", "30", "-w", str(out), flag) as p:
        p.wait_started()
        send_udp(net.ns1, net.ip2, 5309, count=30)
        assert p.wait(30) == 0, p.stderr
    with VnetProcess("trace", "-r", str(out), "--json") as r:
        assert r.wait(15) == 0, r.stderr
    assert [e["dport"] for e in map(parse_event_line, r.stdout)] == [5309] * 30
    assert_no_orphans(before)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_stops_cleanly_on_signal(net, before, signum):
    def udp_lines(lines):
        return [ln for ln in lines if " UDP " in ln and f"{net.ip1}:" in ln and f" > {net.ip2}:5305 " in ln]

    with VnetProcess("trace", "-i", net.spec1, "-i", net.spec2) as p:
        p.wait_started()
        ids = p.bpf_ids()
        assert len(ids.progs) == 4 and len(ids.links) == (4 if TCX else 0)
        send_udp(net.ns1, net.ip2, 5305, count=20)
        p.wait_stdout(lambda lines: len(udp_lines(lines)) >= 40)
        p.signal(signum)
        rc = p.wait(15)
    assert rc == 0, p.stderr
    udp = udp_lines(p.stdout)
    assert len(udp) == 40  # text format: egress at ifA and ingress at ifB, 20 each
    assert len([ln for ln in udp if f" {net.ns1}/{net.if1}:egress " in ln]) == 20
    summary = p.summary()
    assert summary["printed"] == len(p.stdout) == summary["received"]
    assert summary["lost"] == 0 and summary["hooks"] == 4
    assert not any("Traceback" in ln for ln in p.stderr)
    assert_released(ids)
    assert_nothing_on(net.ns1, net.if1)
    assert_nothing_on(net.ns2, net.if2)
    assert_no_orphans(before)


@pytest.mark.skipif(not TCX, reason="a clsact filter outlives its process by design (see the clsact test)")
def test_cli_sigkill_leaves_nothing_and_a_new_trace_works(net, before):
    with VnetProcess("trace", "-i", net.spec1) as p:
        p.wait_started()
        killed = p.bpf_ids()
        assert len(killed.progs) == 2 and len(killed.links) == 2
        p.signal(signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
    # tcx links belong to the process's file descriptors: they go with it (asynchronously).
    assert_released(killed, "the SIGKILLed vnet")
    assert_nothing_on(net.ns1, net.if1)

    with VnetProcess("trace", "-i", net.spec1, "-c", "5", "--json") as p:
        p.wait_started()
        ids = p.bpf_ids()
        assert not ids.progs & killed.progs
        with udp_stream(net.ns1, net.ip2, 5306):
            rc = p.wait(20)
    assert rc == 0, p.stderr
    assert len([parse_event_line(ln) for ln in p.stdout]) == 5
    assert_released(ids)
    assert_nothing_on(net.ns1, net.if1)
    assert_no_orphans(before)


CLSACT_CHILD = textwrap.dedent("""
    import json, socket, sys
    from vnet import netns
    from vnet.binding import BpfObject, RingBuffer
    from vnet.objects import object_path

    ns, ifname = sys.argv[1], sys.argv[2]
    obj = BpfObject(object_path("tc_trace"))
    obj.set_config("tc_cfg", {"probe_id": 7, "wakeup_every": 1})
    obj.load()
    with netns.enter(ns):  # ifindex and the tc netlink socket belong to the namespace
        ifindex = socket.if_nametoindex(ifname)
        links = [obj.programs["vnet_tc_ingress"].attach_tc_filter(ifindex, True, ns),
                 obj.programs["vnet_tc_egress"].attach_tc_filter(ifindex, False, ns)]
    ring = RingBuffer(obj.maps["vnet_events"])
    print("attached", links[0].prog_id, links[1].prog_id, json.dumps([l.left_behind() for l in links]), flush=True)
    for line in sys.stdin:
        if line.strip() == "count":
            print(len(ring.drain()), flush=True)
        elif line.strip() == "close":
            obj.close()
            print("closed", flush=True)
            break
""")


def readline(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """One line of a child's stdout, waiting at most `timeout` (it writes whole lines, flushed)."""
    poller = select.poll()  # not select(): after the unit tests, descriptors pass 1023
    poller.register(proc.stdout, select.POLLIN)
    assert poller.poll(timeout * 1000), f"no output from {proc.args[:3]} within {timeout} s"
    return proc.stdout.readline()


def clsact_child(ns: str, dev: str) -> tuple[subprocess.Popen, list[str]]:
    """CLSACT_CHILD attached to ns/dev: the process and its "attached" line's words
    (ingress and egress prog ids, then the filters' left_behind records as JSON)."""
    c = subprocess.Popen([sys.executable, "-c", CLSACT_CHILD, ns, dev], cwd=ROOT, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    words = readline(c).split(maxsplit=3)
    assert words[:1] == ["attached"], c.stderr.read() if c.poll() is not None else words
    return c, words


def filter_prog_id(line: str) -> int:
    words = line.split()
    return int(words[words.index("id") + 1])


def test_clsact_filter_of_a_killed_process_is_replaced_by_the_next_one(net, before):
    """Kernels without tcx: a clsact filter outlives a SIGKILLed vnet. The fixed handle
    makes the next vnet replace it (one filter, the new program) instead of stacking."""
    ns, dev = net.ns1, net.if1
    children: list[subprocess.Popen] = []

    def child() -> tuple[subprocess.Popen, int, int]:
        c, words = clsact_child(ns, dev)
        children.append(c)
        return c, int(words[1]), int(words[2])

    try:
        first, old_in, old_out = child()
        first.kill()
        first.wait(10)
        stale_in, stale_out = tc_filters(ns, dev, "ingress"), tc_filters(ns, dev, "egress")
        assert len(stale_in) == 1 and len(stale_out) == 1  # the killed process's filters stay
        assert f"handle {hex(VNET_TC_HANDLE)}" in stale_in[0]
        assert (filter_prog_id(stale_in[0]), filter_prog_id(stale_out[0])) == (old_in, old_out)

        second, new_in, new_out = child()
        now_in, now_out = tc_filters(ns, dev, "ingress"), tc_filters(ns, dev, "egress")
        assert len(now_in) == 1 and len(now_out) == 1  # replaced, not stacked
        assert f"handle {hex(VNET_TC_HANDLE)}" in now_in[0]
        assert (filter_prog_id(now_in[0]), filter_prog_id(now_out[0])) == (new_in, new_out)
        # The stale programs lost their last reference with their filter.
        left = wait_released(BpfIds(frozenset({old_in, old_out}), frozenset()))
        assert not left.progs
        # The replacement traces.
        send_udp(ns, net.ip2, 5307, count=10)
        second.stdin.write("count\n")
        second.stdin.flush()
        assert int(readline(second)) >= 10
        second.stdin.write("close\n")
        second.stdin.flush()
        assert readline(second).strip() == "closed"
        assert second.wait(10) == 0
        assert tc_filters(ns, dev, "ingress") == [] and tc_filters(ns, dev, "egress") == []
        # The qdisc was created by the killed process: nobody alive owns it, so vnet leaves it.
        assert has_clsact(ns, dev)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
            c.wait(10)
            for s in (c.stdin, c.stdout, c.stderr):
                s.close()
        sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "clsact", check=False)
    assert_nothing_on(ns, dev)
    assert_no_orphans(before)


def test_what_a_killed_process_left_on_clsact_is_removed_from_its_record(net, before):
    """What a restarted agent does with the records in a killed agent's spool
    (remove_left_tc_filter): the filters whose programs are still the killed process's are
    removed, then the clsact qdisc it created; a filter a newer vnet put there is left."""
    import json

    from vnet.binding import remove_left_tc_filter

    ns, dev = net.ns1, net.if1
    c, words = clsact_child(ns, dev)
    try:
        records = json.loads(words[3])
        c.kill()
        c.wait(10)
    finally:
        for s in (c.stdin, c.stdout, c.stderr):
            s.close()
    assert [r["qdisc"] for r in records] == [True, True]  # both sit on the qdisc that process created
    assert len(tc_filters(ns, dev, "ingress")) == 1 and len(tc_filters(ns, dev, "egress")) == 1
    # a record whose program is not the one running there (a newer vnet's filter): left
    assert not remove_left_tc_filter(**{**records[0], "prog_id": records[0]["prog_id"] + 10_000})
    assert len(tc_filters(ns, dev, "ingress")) == 1
    assert remove_left_tc_filter(**records[0])
    assert tc_filters(ns, dev, "ingress") == [] and has_clsact(ns, dev)  # egress's filter still on it
    assert remove_left_tc_filter(**records[1])
    assert tc_filters(ns, dev, "egress") == []
    assert not has_clsact(ns, dev)  # the qdisc the killed process made, now empty, goes
    assert remove_left_tc_filter(**records[1]) is False  # gone already: nothing to do
    left = wait_released(BpfIds(frozenset(int(w) for w in words[1:3]), frozenset()))
    assert not left.progs
    assert_nothing_on(ns, dev)
    assert_no_orphans(before)


# -- CLI: errors ----------------------------------------------------------------------------------------

def run_cli(*args: str, prefix: tuple[str, ...] = (), timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "vnet", *args], capture_output=True, text=True,
                          timeout=timeout, cwd="/", stdin=subprocess.DEVNULL)


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vnet: error: "), proc.stderr
    assert proc.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", ["no-such-interface", "no-such-netns", "bad-ring-size", "bad-direction"])
def test_cli_errors_are_one_line_with_a_distinct_exit_code(net, before, case):
    args, code, needles = {
        "no-such-interface": (["-i", f"{net.ns1}/nosuch0"], 4, ["no such interface: nosuch0", net.ns1]),
        "no-such-netns": (["-i", "vnetnosuchns/eth0"], 4, ["no such network namespace: vnetnosuchns"]),
        "bad-ring-size": (["-i", net.spec1, "--ring-size", "1000"], 2, ["power of two", "1000"]),
        "bad-direction": (["-i", net.spec1, "--direction", "sideways"], 2, ["sideways"]),
    }[case]
    # A good interface first: failing on a later argument leaves nothing of the first behind.
    proc = run_cli("trace", "-i", net.spec2, *args, "-c", "1")
    assert_one_error_line(proc, code, *needles)
    assert_nothing_on(net.ns1, net.if1)
    assert_nothing_on(net.ns2, net.if2)
    assert_no_orphans(before)


def _nobody_can_run_the_venv() -> bool:
    probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                            sys.executable, "-c", "import vnet.cli.main"],
                           capture_output=True, text=True, timeout=30, cwd="/")
    return probe.returncode == 0


@pytest.mark.parametrize("who", ["nobody", "root-without-capabilities"])
def test_cli_without_privileges_fails_with_one_line(before, who):
    if who == "nobody":
        # The venv (and the interpreter it links to) must be readable by uid 65534.
        if not _nobody_can_run_the_venv():
            pytest.skip("uid 65534 cannot run this venv's python (checkout or interpreter not world-readable)")
        prefix = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
        running_as = f"uid {NOBODY}"
    else:
        # uid 0 with an empty bounding set: exec leaves it no capability at all.
        prefix = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")
        running_as = "root"
    proc = run_cli("trace", "-i", "lo", "-c", "1", prefix=prefix)
    line = assert_one_error_line(proc, 3, "CAP_BPF", "CAP_NET_ADMIN", running_as)
    assert "sudo" in line
    assert_no_orphans(before)


# -- CLI: loss reporting --------------------------------------------------------------------------------

def test_cli_reports_losses_of_a_full_ring(net, before):
    n, dport = 2000, 5308
    with VnetProcess("trace", "-i", net.spec1, "--ring-size", "4096") as p, udp_sink(net.ns2, dport) as sink:
        p.wait_started()
        ids = p.bpf_ids()
        p.signal(signal.SIGSTOP)
        try:
            assert wait_until(lambda: p.state() == "T", 5), "vnet did not stop"
            send_udp(net.ns1, net.ip2, dport, count=n)  # through ifA's egress hook when it returns
            assert sink.received(timeout=5, expect=1) >= 1
        finally:
            p.signal(signal.SIGCONT)
        p.wait_stdout_quiet(0.5, timeout=10)  # what fitted into the ring is printed
        p.signal(signal.SIGINT)
        rc = p.wait(15)
    assert rc == 0, p.stderr
    s = p.summary()
    assert s["lost"] > 0 and s["seen"] >= n
    assert s["printed"] == s["received"] == len(p.stdout)
    assert s["received"] + s["lost"] <= s["seen"]
    assert_released(ids)
    assert_no_orphans(before)
