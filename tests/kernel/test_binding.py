"""The libbpf binding against the running kernel, nothing mocked: the committed
bpf/build/tc_trace.bpf.o is opened, configured, loaded, run on crafted packets
(BPF_PROG_TEST_RUN), attached and detached; its ring buffer is drained and
decoded with the layout its own BTF describes.

Needs root (tests/kernel/conftest.py skips otherwise). Tools used: bpftool, tc,
ip; clang for the verifier-failure test (skipped without it unless $CI is set).
"""

from __future__ import annotations

import errno
import gc
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kernel_support import bpftool_json
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw

from vnet.binding import BpfObject, RingBuffer, TcFilterLink
from vnet.errors import AttachError, BpfError, VerifierError

pytestmark = pytest.mark.kernel

ROOT = Path(__file__).resolve().parents[2]
OBJECT = ROOT / "bpf" / "build" / "tc_trace.bpf.o"
PROG = "vnet_tc_ingress"
OTHER = "vnet_tc_egress"
LO = 1  # loopback's ifindex in the root namespace; BPF_PROG_TEST_RUN also runs on loopback
PROBE_ID = 0x5EED
LEAK_CYCLES = int(os.environ.get("VNET_LEAK_CYCLES", "1000"))
VNET_TC_HANDLE = 0x766E


# -- helpers ----------------------------------------------------------------------------------------------

def open_object(path: Path = OBJECT, **config) -> BpfObject:
    obj = BpfObject(path)
    obj.set_config("tc_cfg", {"probe_id": PROBE_ID, "wakeup_every": 1, **config})
    obj.keep_programs([PROG])
    return obj


@pytest.fixture
def loaded():
    obj = open_object()
    try:
        obj.load()
        yield obj, RingBuffer(obj.maps["vnet_events"])
    finally:
        obj.close()


def run(obj: BpfObject, ring: RingBuffer, frame: bytes) -> dict:
    """Test-run the program on one frame; the one event it emitted, decoded with the object's BTF."""
    layout = obj.btf.struct("vnet_event")
    res = obj.programs[PROG].test_run(frame)
    assert res.retval == 0xFFFFFFFF  # TC_ACT_UNSPEC (-1): the probe never changes the packet's fate
    assert res.data_out == frame  # ... nor its bytes
    records = ring.drain()
    assert len(records) == 1 and len(records[0]) == layout.size
    return layout.decode(records[0])


def eth(dst: str = "02:00:00:00:00:02") -> Ether:
    # Explicit MACs: left out, scapy resolves them (ARP/NDP on the real network, and slow).
    return Ether(src="02:00:00:00:00:01", dst=dst)


def flags(obj: BpfObject, *names: str) -> int:
    enum = obj.btf.enum("vnet_event_flag")
    return sum(enum[f"VNET_F_{n}"] for n in names)


def addr(text: str) -> bytes:
    return ipaddress.ip_address(text).packed.ljust(16, b"\0")


def stats(obj: BpfObject) -> dict[str, int]:
    """The per-CPU vnet_stats counters summed over CPUs, by enum vnet_stat name."""
    per_cpu = obj.maps["vnet_stats"].lookup((0).to_bytes(4, "little"))
    layout = obj.btf.struct("vnet_stats")
    totals = [sum(col) for col in zip(*(layout.decode(v)["v"] for v in per_cpu))]
    return {name: totals[i] for name, i in obj.btf.enum("vnet_stat").items() if i < len(totals)}


def fdinfo(fd: int) -> dict[str, str]:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def vnet_links() -> dict[int, int]:
    """Every bpf_link in the system whose program is named vnet_*: link id -> prog id.
    (bpftool 7.1 shows no program name for tcx links: map ids through `prog show`.)"""
    need_tool("bpftool")
    names = {p["id"]: p.get("name", "") for p in bpftool_json("prog", "show")}
    return {ln["id"]: ln["prog_id"] for ln in bpftool_json("link", "show")
            if names.get(ln.get("prog_id"), "").startswith("vnet_")}


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def need_tool(name: str) -> None:
    if shutil.which(name) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} not installed; CI must have it")
        pytest.skip(f"{name} not installed")


# -- open, configure, load --------------------------------------------------------------------------------

def test_open_configure_load_and_read_config_back():
    with BpfObject(OBJECT) as obj:
        assert set(obj.programs) == {PROG, OTHER} and {"vnet_events", "vnet_stats"} <= set(obj.maps)
        assert all(p.autoload for p in obj.programs.values())
        obj.set_config("tc_cfg", {"probe_id": PROBE_ID, "wakeup_every": 3})
        obj.keep_programs([PROG])
        assert obj.programs[PROG].autoload and not obj.programs[OTHER].autoload
        obj.load()
        assert obj.loaded
        # Read back after load: libbpf maps the frozen kernel .rodata map in place of the image.
        config = obj.config("tc_cfg")
        assert (config["probe_id"], config["wakeup_every"]) == (PROBE_ID, 3)
        assert not any(any(v) if isinstance(v, (bytes, tuple)) else v for k, v in config.items() if k.startswith("f_"))
        assert obj.programs[PROG].fd >= 0
        assert fdinfo(obj.programs[PROG].fd)["prog_type"] == "3"  # BPF_PROG_TYPE_SCHED_CLS
        with pytest.raises(BpfError, match=f"program {OTHER}"):
            obj.programs[OTHER].fd  # autoload False: never loaded, no fd
        with pytest.raises(BpfError, match="set config") as exc:
            obj.set_config("tc_cfg", {"probe_id": 1})  # .rodata is frozen once loaded
        assert exc.value.errno == errno.EBUSY
    with pytest.raises(KeyError):
        BpfObject(OBJECT).keep_programs(["no_such_program"])


def test_probe_id_from_config_reaches_the_event(loaded):
    obj, ring = loaded
    ev = run(obj, ring, bytes(eth() / IP() / UDP()))
    assert ev["probe_id"] == PROBE_ID


# -- packets through BPF_PROG_TEST_RUN ----------------------------------------------------------------------

def test_ipv4_udp(loaded):
    obj, ring = loaded
    frame = bytes(eth() / IP(src="10.1.2.3", dst="10.4.5.6", id=0x1234, ttl=33)
                  / UDP(sport=5353, dport=53) / b"payload")
    before = time.monotonic_ns()
    ev = run(obj, ring, frame)
    after = time.monotonic_ns()
    assert before <= ev["ts_ns"] <= after  # bpf_ktime_get_ns() is CLOCK_MONOTONIC (an order, not a timing)
    assert ev["hook"] == obj.btf.enum("vnet_hook")["VNET_HOOK_TC_INGRESS"]
    assert ev["ifindex"] == LO and ev["len"] == len(frame) == 49 and ev["mark"] == 0
    assert (ev["eth_proto"], ev["l4_proto"], ev["ttl"], ev["ip_id"]) == (0x0800, 17, 33, 0x1234)
    assert (ev["saddr"], ev["daddr"]) == (addr("10.1.2.3"), addr("10.4.5.6"))
    assert (ev["sport"], ev["dport"]) == (5353, 53)
    assert ev["flags"] == flags(obj, "IPV4", "PORTS")
    assert (ev["tcp_seq"], ev["tcp_ack"], ev["tcp_flags"], ev["vlan_tci"]) == (0, 0, 0, 0)
    assert ev["pkt_id"] != 0


def test_ipv4_tcp(loaded):
    obj, ring = loaded
    frame = bytes(eth() / IP(src="192.0.2.1", dst="198.51.100.2", id=7)
                  / TCP(sport=40000, dport=443, seq=0xDEADBEEF, ack=0x01020304, flags="PA") / b"GET /")
    ev = run(obj, ring, frame)
    assert (ev["eth_proto"], ev["l4_proto"], ev["ip_id"], ev["len"]) == (0x0800, 6, 7, len(frame))
    assert (ev["saddr"], ev["daddr"]) == (addr("192.0.2.1"), addr("198.51.100.2"))
    assert (ev["sport"], ev["dport"]) == (40000, 443)
    assert (ev["tcp_seq"], ev["tcp_ack"], ev["tcp_flags"]) == (0xDEADBEEF, 0x01020304, 0x18)  # PSH|ACK
    assert ev["flags"] == flags(obj, "IPV4", "PORTS")


def test_ipv6_udp(loaded):
    obj, ring = loaded
    frame = bytes(eth() / IPv6(src="fd00::1", dst="fd00:1::2", hlim=7) / UDP(sport=1000, dport=2000) / b"v6")
    ev = run(obj, ring, frame)
    assert (ev["eth_proto"], ev["l4_proto"], ev["ttl"], ev["ip_id"]) == (0x86DD, 17, 7, 0)
    assert (ev["saddr"], ev["daddr"]) == (addr("fd00::1"), addr("fd00:1::2"))
    assert (ev["sport"], ev["dport"], ev["len"]) == (1000, 2000, len(frame))
    assert ev["flags"] == flags(obj, "IPV6", "PORTS")


def test_ipv4_icmp_echo(loaded):
    obj, ring = loaded
    frame = bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2", id=99) / ICMP(type=8, code=0, id=0x4242, seq=1))
    ev = run(obj, ring, frame)
    assert (ev["eth_proto"], ev["l4_proto"], ev["ip_id"]) == (0x0800, 1, 99)
    assert (ev["sport"], ev["dport"]) == (0x4242, 8 << 8)  # ICMP: sport = echo id, dport = type << 8 | code
    assert ev["flags"] == flags(obj, "IPV4")  # no PORTS: these are not ports
    assert (ev["saddr"], ev["daddr"]) == (addr("10.0.0.1"), addr("10.0.0.2"))


def test_vlan_tagged_ipv4_udp(loaded):
    """What the program sees: BPF_PROG_TEST_RUN builds the skb with eth_type_trans(),
    which sets skb->protocol from the outer EtherType (0x8100) and does not untag:
    no hardware-accelerated tag (vlan_present = 0), network header right after the
    14-byte Ethernet header, i.e. at the tag. The program therefore takes its
    in-band path: it reads the TCI and inner EtherType from the frame at MAC+14 and
    the IP header at MAC+18. The event must report the inner protocol, the TCI and
    the ports, exactly as for an offloaded tag; len counts the tag (whole frame)."""
    obj, ring = loaded
    frame = bytes(eth() / Dot1Q(vlan=100, prio=3) / IP(src="10.9.0.1", dst="10.9.0.2", id=5)
                  / UDP(sport=67, dport=68) / b"dhcp")
    ev = run(obj, ring, frame)
    assert ev["vlan_tci"] == (3 << 13) | 100
    assert (ev["eth_proto"], ev["l4_proto"], ev["ip_id"]) == (0x0800, 17, 5)
    assert (ev["saddr"], ev["daddr"], ev["sport"], ev["dport"]) == (addr("10.9.0.1"), addr("10.9.0.2"), 67, 68)
    assert ev["flags"] == flags(obj, "VLAN", "IPV4", "PORTS")
    assert ev["len"] == len(frame) == 18 + 20 + 8 + 4


def test_qinq_shows_the_tag_is_seen_in_band(loaded):
    """Evidence for the docstring above: with two tags, had test-run offloaded the
    outer one (vlan_present), the frame would start with the inner tag and the
    program would report TCI 6 and EtherType 0x0800. It reports the outer TCI 5
    and the next EtherType (the inner tag's 0x8100): the outer tag was in-band.
    (The program parses one in-band tag; a QinQ frame stops at the inner tag.)"""
    obj, ring = loaded
    ev = run(obj, ring, bytes(eth() / Dot1AD(vlan=5) / Dot1Q(vlan=6) / IP() / UDP()))
    assert (ev["vlan_tci"], ev["eth_proto"]) == (5, 0x8100)
    assert ev["flags"] == flags(obj, "VLAN")


def test_arp(loaded):
    obj, ring = loaded
    frame = bytes(eth(dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc="10.0.0.1", pdst="10.0.0.2"))
    ev = run(obj, ring, frame)
    assert (ev["eth_proto"], ev["l4_proto"], ev["flags"], ev["len"]) == (0x0806, 0, 0, len(frame))
    assert (ev["sport"], ev["dport"], ev["saddr"], ev["daddr"]) == (0, 0, bytes(16), bytes(16))
    other = run(obj, ring, bytes(eth(dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, psrc="10.0.0.1", pdst="10.0.0.3")))
    assert ev["pkt_id"] != other["pkt_id"]  # ARP is identified by its first L3 bytes


def test_ipv4_non_first_fragment(loaded):
    obj, ring = loaded
    frame = bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2", id=77, proto=17, frag=100) / Raw(b"y" * 40))
    ev = run(obj, ring, frame)
    assert (ev["eth_proto"], ev["l4_proto"], ev["ip_id"]) == (0x0800, 17, 77)
    assert ev["flags"] == flags(obj, "IPV4", "FRAGMENT")  # no PORTS: a later fragment has no UDP header
    assert (ev["sport"], ev["dport"]) == (0, 0)  # the payload is not misread as ports
    first = run(obj, ring, bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2", id=77, flags="MF")
                                 / UDP(sport=9, dport=10) / Raw(b"y" * 40)))
    assert first["flags"] == flags(obj, "IPV4", "PORTS") and (first["sport"], first["dport"]) == (9, 10)


# -- pkt_id: the identity of a packet along its path ------------------------------------------------------

def _udp(ip_id=1, ttl=64, payload=b"hello world"):
    return bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2", id=ip_id, ttl=ttl) / UDP(sport=1234, dport=80) / payload)


def _tcp(seq=1000, ttl=64):
    return bytes(eth() / IP(src="10.0.0.1", dst="10.0.0.2", id=1, ttl=ttl) / TCP(sport=1234, dport=80, seq=seq))


def test_pkt_id_is_a_function_of_the_bytes(loaded):
    obj, ring = loaded
    for frame in (_udp(), _tcp()):
        assert run(obj, ring, frame)["pkt_id"] == run(obj, ring, frame)["pkt_id"]


@pytest.mark.parametrize("a, b", [
    (_udp(ip_id=1), _udp(ip_id=2)),
    (_tcp(seq=1000), _tcp(seq=1001)),
    (_udp(payload=b"hello world"), _udp(payload=b"hello worle")),
], ids=["ip_id", "tcp_seq", "udp_payload"])
def test_pkt_id_differs_when_an_identifying_field_differs(loaded, a, b):
    obj, ring = loaded
    assert run(obj, ring, a)["pkt_id"] != run(obj, ring, b)["pkt_id"]


@pytest.mark.parametrize("a, b", [
    (_udp(ttl=64), _udp(ttl=63)),
    (_tcp(ttl=64), _tcp(ttl=1)),
], ids=["udp", "tcp"])
def test_pkt_id_ignores_ttl(loaded, a, b):
    # TTL (and with it the IP checksum, which scapy recomputes) changes at every router hop.
    obj, ring = loaded
    ea, eb = run(obj, ring, a), run(obj, ring, b)
    assert ea["ttl"] != eb["ttl"] and a[24:26] != b[24:26]  # the frames differ in TTL and checksum...
    assert ea["pkt_id"] == eb["pkt_id"]  # ... yet are the same packet


# -- counters and loss ------------------------------------------------------------------------------------

def test_stats_count_every_run(loaded):
    obj, ring = loaded
    n = 25
    for i in range(n):
        obj.programs[PROG].test_run(_udp(ip_id=i))
    assert stats(obj) == {"VNET_STAT_SEEN": n, "VNET_STAT_EMITTED": n, "VNET_STAT_LOST": 0, "VNET_STAT_FILTERED": 0}
    assert len(ring.drain()) == n


def test_full_ring_counts_loss():
    page = os.sysconf("SC_PAGE_SIZE")
    obj = open_object()
    try:
        obj.maps["vnet_events"].max_entries = page  # the smallest ring the kernel accepts
        obj.load()
        assert obj.maps["vnet_events"].max_entries == page
        runs = 200
        for i in range(runs):
            obj.programs[PROG].test_run(_udp(ip_id=i))  # nobody drains meanwhile
        st = stats(obj)
        assert st["VNET_STAT_SEEN"] == runs
        assert st["VNET_STAT_EMITTED"] + st["VNET_STAT_LOST"] == runs
        assert st["VNET_STAT_LOST"] > 0
        # A ring record is an 8-byte header plus the event rounded up to 8 bytes; the kernel
        # refuses the record that would fill the ring exactly (producer - consumer <= mask).
        record = 8 + (obj.btf.struct("vnet_event").size + 7) // 8 * 8
        assert st["VNET_STAT_EMITTED"] == (page - 1) // record
        records = RingBuffer(obj.maps["vnet_events"]).drain()
        assert len(records) == st["VNET_STAT_EMITTED"]
        # What made it is the first events, in order: loss is at the tail, never silent reordering.
        layout = obj.btf.struct("vnet_event")
        assert [layout.decode(r)["ip_id"] for r in records] == list(range(len(records)))
    finally:
        obj.close()


# -- lifetimes --------------------------------------------------------------------------------------------

def test_open_load_attach_close_cycles_leak_nothing():
    """LEAK_CYCLES cycles of open -> load -> tcx attach on lo ingress -> RingBuffer -> close.
    No fd may survive a cycle, and no link or program of ours may survive close()."""
    need_tool("bpftool")  # before the cycles, not after them

    def cycle():
        obj = open_object()
        obj.load()
        prog = obj.programs[PROG]
        link = prog.attach_tcx(LO, ingress=True)
        RingBuffer(obj.maps["vnet_events"])
        ids = (int(fdinfo(prog.fd)["prog_id"]), int(fdinfo(link.fd)["link_id"]))
        obj.close()
        assert not link.attached
        return ids

    cycle()  # warm-up: libbpf and Python load what they cache once per process
    links_before = vnet_links()
    fds_before = open_fds()
    prog_ids, link_ids = set(), set()
    for _ in range(LEAK_CYCLES):
        p, ln = cycle()
        prog_ids.add(p)
        link_ids.add(ln)
    gc.collect()
    assert open_fds() == fds_before
    assert len(prog_ids) == len(link_ids) == LEAK_CYCLES  # each cycle really loaded and attached
    # Compare the vnet_* links before and after. Other processes (a concurrent test run)
    # may attach their own meanwhile, so a new link fails the test only if it is ours.
    links_after = vnet_links()
    new_links = {lid: pid for lid, pid in links_after.items() if lid not in links_before}
    assert not {lid for lid, pid in new_links.items() if lid in link_ids or pid in prog_ids}
    assert not set(links_after) & link_ids and not set(links_after.values()) & prog_ids
    # Their programs are gone from the kernel too (a link or fd we leaked would pin them).
    assert not {p["id"] for p in bpftool_json("prog", "show")} & prog_ids


def test_unclosed_object_with_a_ring_buffer_is_freed_by_gc():
    # Regression: the object's finalizer owned the RingBuffer, which references the
    # object (through its map), so an object never closed was never freed either.
    fds = open_fds()
    obj = open_object()
    obj.load()
    obj.programs[PROG].attach_tcx(LO, ingress=True)
    RingBuffer(obj.maps["vnet_events"])
    assert open_fds() != fds
    del obj
    gc.collect()
    assert open_fds() == fds


def test_dropped_ring_buffer_is_freed_before_its_object(loaded):
    obj, _ = loaded
    fds = open_fds()
    ring = RingBuffer(obj.maps["vnet_events"])  # its epoll fd
    assert len(open_fds() - fds) == 1
    del ring
    gc.collect()
    assert open_fds() == fds
    ring = RingBuffer(obj.maps["vnet_events"])  # the map is still readable
    obj.programs[PROG].test_run(_udp())
    assert len(ring.drain()) == 1


def test_close_is_idempotent_and_detaches(loaded):
    obj, _ = loaded
    link = obj.programs[PROG].attach_tcx(LO, ingress=False)
    link_id = int(fdinfo(link.fd)["link_id"])
    assert link_id in vnet_links()
    obj.close()
    obj.close()
    assert not link.attached and link_id not in vnet_links()
    link.detach()  # idempotent too


# -- errors -----------------------------------------------------------------------------------------------

def test_open_missing_file_raises_enoent(tmp_path):
    missing = tmp_path / "nope.bpf.o"
    with pytest.raises(BpfError) as exc:
        BpfObject(missing)
    assert exc.value.errno == errno.ENOENT
    assert "open BPF object" in str(exc.value) and str(missing) in str(exc.value)


def test_tcx_attach_to_missing_interface(loaded):
    obj, _ = loaded
    prog = obj.programs[PROG]
    prog_id = int(fdinfo(prog.fd)["prog_id"])
    with pytest.raises(AttachError) as exc:
        prog.attach_tcx(999999, ingress=True)
    assert exc.value.errno == errno.ENODEV
    msg = str(exc.value)
    assert "attach tcx link" in msg and PROG in msg and "ifindex 999999" in msg and "\n" not in msg
    assert prog_id not in vnet_links().values()  # nothing attached


def test_tc_filter_attach_to_missing_interface(loaded):
    obj, _ = loaded
    with pytest.raises(AttachError) as exc:
        obj.programs[PROG].attach_tc_filter(999999, ingress=True)
    assert exc.value.errno == errno.ENODEV and "ifindex 999999" in str(exc.value)


def test_kprobe_attach_to_missing_function(loaded):
    # Without kprobe support libbpf fails earlier than with it (no PMU / tracefs event),
    # so only the type, the message and that a hint is given are asserted.
    obj, _ = loaded
    func = "vnet_no_such_kernel_function"
    with pytest.raises(AttachError) as exc:
        obj.programs[PROG].attach_kprobe(func)
    assert exc.value.hint
    assert "attach kprobe" in str(exc.value) and func in str(exc.value) and PROG in str(exc.value)


def test_test_run_before_load_raises():
    with BpfObject(OBJECT) as obj:
        with pytest.raises(BpfError) as exc:
            obj.programs[PROG].test_run(_udp())
        assert PROG in str(exc.value) and "not loaded" in str(exc.value)


def test_failed_map_creation_names_the_object_and_the_cause():
    # Not a verifier error: the kernel refuses a map. The one-line message says which and why.
    obj = open_object()
    try:
        obj.maps["vnet_stats"].max_entries = 0
        with pytest.raises(BpfError) as exc:
            obj.load()
        e = exc.value
        assert not isinstance(e, VerifierError) and e.errno == errno.EINVAL and not obj.loaded
        assert str(e).startswith(f"load {OBJECT.name} failed: ")
        assert "map 'vnet_stats': failed to create" in str(e) and "\n" not in str(e)
    finally:
        obj.close()


# -- the verifier's rejection -----------------------------------------------------------------------------

BAD_PROGRAM = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

/* A CO-RE relocation makes libbpf log this (valid) program's name while loading it. */
struct sk_buff { unsigned int len; } __attribute__((preserve_access_index));

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} one SEC(".maps");

SEC("tc")
int good_prog(struct __sk_buff *skb)
{
	return bpf_core_field_exists(struct sk_buff, len) ? 0 : 1;
}

SEC("tc")
int bad_prog(struct __sk_buff *skb)
{
	__u32 key = 0;
	__u64 acc = 0, *v = bpf_map_lookup_elem(&one, &key);

	if (!v)
		return 0;
#ifdef PAD
#pragma unroll
	for (int i = 0; i < PAD; i++) /* a long log before the error */
		acc += bpf_get_prandom_u32();
#endif
	return (int)(acc + v[1]); /* reads 8 bytes past the 8-byte value */
}

char LICENSE[] SEC("license") = "GPL";
"""


def compile_bpf(tmp_path: Path, source: str, *defines: str) -> Path:
    clang = shutil.which("clang")
    if clang is None:
        if os.environ.get("CI"):
            pytest.fail("clang not installed: CI must have it to test the verifier-failure path")
        pytest.skip("clang not installed")
    src, obj = tmp_path / "bad.bpf.c", tmp_path / "bad.bpf.o"
    src.write_text(source)
    subprocess.run([clang, "-g", "-O2", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu",
                    *(f"-D{d}" for d in defines), "-c", str(src), "-o", str(obj)], check=True)
    return obj


@pytest.mark.parametrize("pad", [0, 1500], ids=["short_log", "long_log"])
def test_verifier_rejection_raises_verifier_error(tmp_path, pad):
    """long_log: ~6000 lines / ~700 KB of verifier output, printed by libbpf as ONE
    message: the binding once cut it at 4096 bytes (losing the error at its end) and
    kept only the last 4000 lines of libbpf output (losing where the log begins)."""
    path = compile_bpf(tmp_path, BAD_PROGRAM, *([f"PAD={pad}"] if pad else []))
    obj = BpfObject(path)
    try:
        with pytest.raises(VerifierError) as exc:
            obj.load()
    finally:
        obj.close()
    e = exc.value
    assert isinstance(e, BpfError) and e.errno == errno.EACCES and e.op == "load"
    # The culprit is named, not the first program libbpf mentioned (good_prog's CO-RE relocation).
    assert e.target == f"{path.name} program bad_prog"
    lines = e.log.splitlines()
    # The whole verifier log, and only it: from instruction 0 to the summary line.
    assert lines[0].startswith("0: R1=ctx()")
    assert any("invalid access to map value" in ln for ln in lines)
    assert lines[-1].startswith("processed ") and "insns" in lines[-1]
    assert not any(ln.startswith("libbpf:") or "PROG LOAD LOG" in ln for ln in lines)
    if pad:
        assert len(lines) > 4000 and len(e.log) > 4096
    # One line for the user: operation, target, errno, the log's last lines; the full log stays in .log.
    text = str(e)
    tail = " | ".join(lines[-3:])
    assert "\n" not in text
    assert text.startswith(f"load {path.name} program bad_prog failed: ")
    assert e.message.endswith(f"verifier: {tail}")
    # VnetError appends the hint after the message, so str() ends with the tail then the hint.
    assert text == f"{e.message} (hint: {e.hint})" and text.endswith(f"{tail} (hint: {e.hint})")


# -- tc clsact fallback -----------------------------------------------------------------------------------

@pytest.fixture
def scratch_dev():
    """A throwaway interface in the root namespace (dummy, else a veth pair), deleted afterwards."""
    need_tool("ip")
    need_tool("tc")
    name = f"vnt{os.getpid() % 100000}x"
    subprocess.run(["ip", "link", "del", name], capture_output=True)  # a leftover of a killed run
    made = subprocess.run(["ip", "link", "add", name, "type", "dummy"], capture_output=True)
    if made.returncode != 0:  # no dummy driver in this kernel
        subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name[:-1] + "y"], check=True)
    try:
        yield name, socket.if_nametoindex(name)
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True)


def vnet_filters(dev: str, direction: str) -> list[str]:
    return [ln for ln in sh("tc", "filter", "show", "dev", dev, direction).splitlines()
            if f"handle {hex(VNET_TC_HANDLE)}" in ln]


def has_clsact(dev: str) -> bool:
    return "qdisc clsact" in sh("tc", "qdisc", "show", "dev", dev)


def filter_prog_id(line: str) -> int:
    words = line.split()
    return int(words[words.index("id") + 1])


def loaded_both() -> BpfObject:
    obj = BpfObject(OBJECT)
    obj.set_config("tc_cfg", {"probe_id": PROBE_ID})
    obj.load()
    return obj


def test_tc_filter_fallback_keeps_one_filter_and_cleans_up(scratch_dev):
    dev, ifindex = scratch_dev
    assert not has_clsact(dev)
    first = loaded_both()
    second = None
    try:
        links = [first.programs[PROG].attach_tc_filter(ifindex, ingress=True),
                 first.programs[OTHER].attach_tc_filter(ifindex, ingress=False)]
        assert all(isinstance(ln, TcFilterLink) for ln in links)
        assert has_clsact(dev)
        assert len(vnet_filters(dev, "ingress")) == 1 and len(vnet_filters(dev, "egress")) == 1
        old_ids = {filter_prog_id(vnet_filters(dev, d)[0]) for d in ("ingress", "egress")}

        # A second vnet (as after a restart) replaces the filters instead of stacking more.
        second = loaded_both()
        second.programs[PROG].attach_tc_filter(ifindex, ingress=True)
        second.programs[OTHER].attach_tc_filter(ifindex, ingress=False)
        assert len(vnet_filters(dev, "ingress")) == 1 and len(vnet_filters(dev, "egress")) == 1
        new_ids = {filter_prog_id(vnet_filters(dev, d)[0]) for d in ("ingress", "egress")}
        assert not new_ids & old_ids  # the filters now run the second object's programs

        # Closing the older vnet must not take the newer one's filters with it.
        first.close()
        assert {filter_prog_id(vnet_filters(dev, d)[0]) for d in ("ingress", "egress")} == new_ids
        second.close()
        assert vnet_filters(dev, "ingress") == [] and vnet_filters(dev, "egress") == []
        assert not has_clsact(dev)  # the qdisc vnet created went with its last user
    finally:
        first.close()
        if second is not None:
            second.close()


def test_tc_filter_left_by_a_killed_vnet_is_replaced(scratch_dev, tmp_path):
    """A real restart: another process attaches, is SIGKILLed (no cleanup runs), and
    its filter stays in the kernel. A new vnet replaces it (one filter, new program)
    and removes it on close. The clsact qdisc stays: this process did not create
    it, and vnet never deletes a qdisc it does not own."""
    dev, ifindex = scratch_dev
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from vnet.binding import BpfObject
            obj = BpfObject({str(OBJECT)!r})
            obj.load()
            obj.programs[{PROG!r}].attach_tc_filter({ifindex}, ingress=True)
            print("attached", flush=True)
            sys.stdin.read()
        """)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "attached"
    finally:
        child.kill()
        child.wait()
    stale = vnet_filters(dev, "ingress")
    assert len(stale) == 1 and has_clsact(dev)

    obj = loaded_both()
    try:
        obj.programs[PROG].attach_tc_filter(ifindex, ingress=True)
        now = vnet_filters(dev, "ingress")
        assert len(now) == 1 and filter_prog_id(now[0]) != filter_prog_id(stale[0])
        assert filter_prog_id(now[0]) == int(fdinfo(obj.programs[PROG].fd)["prog_id"])
    finally:
        obj.close()
    assert vnet_filters(dev, "ingress") == []
    assert has_clsact(dev)
