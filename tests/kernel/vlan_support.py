"""802.1Q-tagged traffic for real, shared by tests/kernel/test_vlan_snap.py (the host
kernel) and tests/vm/test_vlan_guest.py (Debian's 6.1 kernel).

Two network namespaces, A and B, joined by TWO veth pairs: pair 1 with the veth's
transmit VLAN offload on (`ethtool -K txvlan on rxvlan on`), pair 2 with it off. A
VLAN tag is then where the kernel keeps it at each hook:

- in the skb's metadata (skb->vlan_present/vlan_tci, "hardware-accelerated VLAN"):
  at the sender's TC egress and net_dev_queue (pair 1 and 2), at net_dev_start_xmit,
  veth_xmit and the receiver's netif_receive_skb (pair 1: veth passes the metadata
  on), and at the receiver's TC ingress (always: the kernel untags before TC);
- in the packet's bytes: at net_dev_start_xmit, veth_xmit and netif_receive_skb of
  pair 2 (the kernel pushed the tag in because the device does not take it), and at
  every hook before TC ingress for frames sent with the tag already in them
  (AF_PACKET, `inband`);
- nowhere: on the VLAN devices themselves and after the kernel took the tag away
  (the receiving VLAN device; drop:kfree_skb of a datagram nobody listens for).

A capture shows the tag in the first two cases (vnet puts a metadata tag back after
the MAC addresses, as tcpdump does) and not in the third.

Who tags, `mode`:
- "vlan-dev": real 802.1Q devices (`ip link add link vAn name vlAn type vlan id 100
  egress-qos-map 3:3 5:5`) carry the addresses; the datagrams reach a socket in B.
- "tc-push": for kernels without 802.1Q devices (CONFIG_VLAN_8021Q unset, as on the
  CI host): the addresses are on the veths and a tcx program at A's veth egress
  calls bpf_skb_vlan_push(skb, 802.1Q, 100 | priority << 13) on every IPv4 packet,
  the same __vlan_hwaccel_put_tag a VLAN device's transmit makes. B's stack then
  drops the frames (no VLAN 100 there: PACKET_OTHERHOST, after removing the tag).

Priorities: datagrams go out with SO_PRIORITY 0, 3 and 5, which both modes map to
PCP 0, 3 and 5; the in-band frames carry PCP 6 and 1.

Every payload starts with `vnvl` and its number, so each captured packet names the
datagram it is, whatever the hook (the IP ID differs between runs).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field

from vnet.topology import Topology, in_netns, udp_sink, warm_up

VID = 100
NET = "10.196"              # pair n: NET.<10+n>.1 in A, .2 in B
OTHER_VID = 200
PORT = 5410
CLOSED_PORT = 5411          # nobody listens: the receiver drops these (drop:kfree_skb)
PRIOS = (0, 3, 5)           # SO_PRIORITY of the datagrams = their PCP
INBAND_PRIOS = (6, 1)       # PCP of the frames sent with the tag in their bytes
LONG, SHORT = 200, 40       # payload bytes: longer / shorter than a 128-byte capture
MARK = b"vnvl"
TXVLAN = {1: "on", 2: "off"}


# -- the tagging program of "tc-push" ----------------------------------------------------------------------

SYS_BPF = 321  # x86_64
BPF_PROG_LOAD, BPF_LINK_CREATE = 5, 28
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_TCX_EGRESS = 47
SKB_PROTOCOL, SKB_PRIORITY = 16, 32  # offsets in struct __sk_buff
BPF_FUNC_SKB_VLAN_PUSH = 18
TCX_NEXT = -1  # let the next program of the chain (vnet's) run


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def vlan_push_program(vid: int) -> bytes:
    """IPv4 only (ARP stays untagged, so neighbours still resolve); TCI = vid | (priority & 7) << 13."""
    return b"".join([
        _insn(0xBF, 6, 1),                                       # r6 = r1 (skb)
        _insn(0x61, 0, 6, SKB_PROTOCOL),                         # r0 = skb->protocol
        _insn(0x55, 0, 0, 7, socket.htons(0x0800)),              # if r0 != htons(ETH_P_IP) goto out
        _insn(0x61, 3, 6, SKB_PRIORITY),                         # r3 = skb->priority
        _insn(0x54, 3, 0, 0, 7),                                 # w3 &= 7
        _insn(0x64, 3, 0, 0, 13),                                # w3 <<= 13
        _insn(0x44, 3, 0, 0, vid),                               # w3 |= vid
        _insn(0xBF, 1, 6),                                       # r1 = r6
        _insn(0xB7, 2, 0, 0, socket.htons(0x8100)),              # r2 = htons(ETH_P_8021Q)
        _insn(0x85, 0, 0, 0, BPF_FUNC_SKB_VLAN_PUSH),            # bpf_skb_vlan_push(skb, proto, tci)
        _insn(0xB7, 0, 0, 0, TCX_NEXT),                          # out: r0 = TCX_NEXT
        _insn(0x95),                                             # exit
    ])


def _bpf(cmd: int, attr: bytes) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(attr, 128)
    fd = libc.syscall(SYS_BPF, cmd, buf, 128)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


class VlanPushAtEgress:
    """The tagging program, loaded with bpf(2) and attached as a tcx link at the
    egress of `ifname` in `ns` (first in the chain: vnet's programs, attached
    later, run after it). Both file descriptors are this object's: close()
    detaches and unloads it."""

    def __init__(self, ns: str, ifname: str, vid: int = VID):
        code = vlan_push_program(vid)
        insns = ctypes.create_string_buffer(code, len(code))
        lic = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(1 << 16)
        attr = struct.pack("<IIQQIIQII16s", BPF_PROG_TYPE_SCHED_CLS, len(code) // 8, ctypes.addressof(insns),
                           ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0, b"vlan_push_test")
        try:
            self.prog_fd = _bpf(BPF_PROG_LOAD, attr)
        except OSError as e:
            raise OSError(e.errno, f"loading the VLAN push program: {e.strerror}\n{log.value.decode()}") from e
        try:
            with in_netns(ns):  # the link's ifindex is the calling thread's namespace's
                self.link_fd = _bpf(BPF_LINK_CREATE, struct.pack("<IIII", self.prog_fd, socket.if_nametoindex(ifname),
                                                                 BPF_TCX_EGRESS, 0))
        except BaseException:
            os.close(self.prog_fd)
            raise

    def close(self) -> None:
        for fd in (self.link_fd, self.prog_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


# -- the topology ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    n: int
    txvlan: str
    a_if: str             # the veth ends
    b_if: str
    a_l3: str             # the devices with the addresses: the VLAN devices, or the veths (tc-push)
    b_l3: str
    a_ip: str
    b_ip: str
    a_mac: bytes
    b_mac: bytes


@dataclass
class VlanNet:
    mode: str
    topo: Topology
    ns_a: str
    ns_b: str
    pairs: list[Pair]
    closers: list = field(default_factory=list)

    @property
    def veths(self) -> set[str]:
        return {p.a_if for p in self.pairs} | {p.b_if for p in self.pairs}

    def device_specs(self) -> list[str]:
        """`-i` arguments: every veth end and VLAN device."""
        out = []
        for p in self.pairs:
            out += [f"{self.ns_a}/{p.a_if}", f"{self.ns_b}/{p.b_if}"]
            if self.mode == "vlan-dev":
                out += [f"{self.ns_a}/{p.a_l3}", f"{self.ns_b}/{p.b_l3}"]
        return out

    def trace_plans(self, probes: tuple[str, ...]):
        """Plans for an in-process trace: PROBES, A's devices at egress and B's at ingress
        (where the datagrams pass; half the programs to load of device_specs())."""
        from vnet.trace.selection import select

        devs = []
        for p in self.pairs:
            for ifname in dict.fromkeys((p.a_if, p.a_l3)):
                devs.append(f"dev:{self.ns_a}/{ifname}:egress")
            for ifname in dict.fromkeys((p.b_if, p.b_l3)):
                devs.append(f"dev:{self.ns_b}/{ifname}:ingress")
        return select([], [*devs, *probes], strict=True)[0]

    def close(self) -> None:
        for c in reversed(self.closers):
            c.close()
        self.closers.clear()
        self.topo.close()

    def __enter__(self) -> "VlanNet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def has_vlan_devices() -> bool:
    """Whether this kernel makes 802.1Q devices (loading 8021q where it is a module)."""
    subprocess.run(["modprobe", "-q", "8021q"], capture_output=True, timeout=60, check=False)
    with Topology() as topo:
        ns = topo.add_netns("q")
        topo.run(ns, ["ip", "link", "add", "q0", "type", "veth", "peer", "name", "q1"])
        r = topo.run(ns, ["ip", "link", "add", "link", "q0", "name", "q0.7", "type", "vlan", "id", "7"], check=False)
        return r.returncode == 0


def _mac(topo: Topology, ns: str, ifname: str) -> bytes:
    text = topo.run(ns, ["cat", f"/sys/class/net/{ifname}/address"]).stdout.strip()
    return bytes.fromhex(text.replace(":", ""))


def build(mode: str, net: str = NET, warm_timeout: float = 3.0) -> VlanNet:
    """Namespaces A and B, pairs 1 (txvlan on) and 2 (txvlan off), addresses
    NET.<10+n>.1 and .2, tagging as `mode` says; ARP done before anything traces."""
    assert mode in ("vlan-dev", "tc-push"), mode
    topo = Topology()
    try:
        ns_a, ns_b = topo.add_netns("a"), topo.add_netns("b")
        pairs = []
        for n, txvlan in TXVLAN.items():
            a_if, b_if = topo.add_veth_pair(f"vA{n}", ns_a, f"vB{n}", ns_b)
            l3 = {}
            for ifname, ns, side in ((a_if, ns_a, "A"), (b_if, ns_b, "B")):
                topo.disable_offloads(ifname, ns)
                topo.run(ns, ["ethtool", "-K", ifname, "txvlan", txvlan, "rxvlan", txvlan])
                if mode == "vlan-dev":
                    vl = f"vl{side}{n}"
                    # created after the offload setting: the VLAN device picks its header
                    # handling from the real device's features when it is made
                    topo.run(ns, ["ip", "link", "add", "link", ifname, "name", vl, "type", "vlan", "id", str(VID),
                                  "egress-qos-map", "3:3", "5:5"])
                    topo.run(ns, ["ethtool", "-K", vl, "tx", "off"])  # checksums final from the first hook on
                    topo.run(ns, ["ip", "link", "set", vl, "up"])
                    l3[side] = vl
                else:
                    l3[side] = ifname
            a_ip, b_ip = f"{net}.{10 + n}.1", f"{net}.{10 + n}.2"
            topo.add_address(l3["A"], ns_a, f"{a_ip}/24")
            topo.add_address(l3["B"], ns_b, f"{b_ip}/24")
            pairs.append(Pair(n, txvlan, a_if, b_if, l3["A"], l3["B"], a_ip, b_ip,
                              _mac(topo, ns_a, l3["A"]), _mac(topo, ns_b, l3["B"])))
        for p in pairs:
            warm_up(ns_a, p.b_ip, timeout=warm_timeout)
            warm_up(ns_b, p.a_ip, timeout=warm_timeout)
        vnet = VlanNet(mode, topo, ns_a, ns_b, pairs)
        if mode == "tc-push":  # after ARP and ping: B answers no tagged IPv4 here
            for p in pairs:
                vnet.closers.append(VlanPushAtEgress(ns_a, p.a_if))
        return vnet
    except BaseException:
        topo.close()
        raise


# -- the traffic -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Datagram:
    num: int
    pair: Pair
    prio: int             # SO_PRIORITY, or the in-band tag's PCP
    port: int
    payload: bytes
    inband: bool = False  # sent as a whole frame (AF_PACKET) with the tag in its bytes

    def wire_len(self, tagged: bool) -> int:
        return 14 + (4 if tagged else 0) + 20 + 8 + len(self.payload)

    def frame(self) -> bytes:
        """The in-band frame as sent, tag included (scapy computes the checksums)."""
        from scapy.all import IP, UDP, Dot1Q, Ether, Raw

        p = self.pair
        return bytes(Ether(src=p.a_mac, dst=p.b_mac) / Dot1Q(vlan=VID, prio=self.prio)
                     / IP(src=p.a_ip, dst=p.b_ip, id=0x7600 + self.num) / UDP(sport=40000 + self.num, dport=self.port)
                     / Raw(self.payload))


def payload(num: int, size: int) -> bytes:
    head = MARK + b"%03d;" % num
    body = bytes((num * 7 + i) & 0xFF for i in range(size - len(head)))
    return head + body


def datagrams(net: VlanNet) -> list[Datagram]:
    """Per pair: a long and a short datagram at each priority to PORT, a short one to
    CLOSED_PORT; on pair 2 also the in-band frames."""
    out: list[Datagram] = []
    for p in net.pairs:
        for i, prio in enumerate(PRIOS * 2):
            size = LONG if i % 2 == 0 else SHORT
            out.append(Datagram(len(out), p, prio, PORT, payload(len(out), size)))
        out.append(Datagram(len(out), p, 5, CLOSED_PORT, payload(len(out), SHORT)))
    p2 = net.pairs[1]
    for i, prio in enumerate(INBAND_PRIOS):
        out.append(Datagram(len(out), p2, prio, PORT, payload(len(out), LONG if i == 0 else SHORT), inband=True))
    return out


def send(net: VlanNet, dgrams: list[Datagram]) -> None:
    with in_netns(net.ns_a):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    with udp, raw:
        for d in dgrams:
            if d.inband:
                raw.sendto(d.frame(), (d.pair.a_if, 0))
            else:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, d.prio)
                udp.sendto(d.payload, (d.pair.b_ip, d.port))


@contextlib.contextmanager
def receiver(net: VlanNet):
    """A socket on PORT in B; wait(dgrams, timeout) returns once every datagram that
    reaches a socket (vlan-dev mode) arrived, or at the deadline."""
    with udp_sink(net.ns_b, PORT) as sink:
        base = [len(sink.payloads)]

        def wait(dgrams: list[Datagram], timeout: float) -> None:
            if net.mode == "vlan-dev":
                want = base[0] + sum(d.port == PORT for d in dgrams)
                got = sink.received(expect=want, timeout=timeout)
                assert got == want, f"{got - base[0]} of {want - base[0]} datagrams reached the socket in B"
                assert {pl for pl in sink.payloads[base[0]:]} == {d.payload for d in dgrams if d.port == PORT}
            base[0] = len(sink.payloads)

        yield wait


# -- what a capture must look like -----------------------------------------------------------------------

def hook_key(ev: dict) -> tuple[str, str]:
    """(kind, device): ("dev:egress", "vA1"), ("net:netif_receive_skb", "vB2"), ..."""
    kind = f"dev:{ev['dir']}" if ev["probe"].startswith("dev:") else ev["probe"]
    return kind, ev["ifname"]


def tagged_at(net: VlanNet, key: tuple[str, str]) -> bool:
    """Whether a capture at this hook shows the tag: on the veths, until the kernel takes
    it away (the drops we provoke come after that); never on the VLAN devices."""
    kind, ifname = key
    return ifname in net.veths and kind != "drop:kfree_skb"


def datagram_of(data: bytes, dgrams: list[Datagram]) -> Datagram | None:
    m = re.search(re.escape(MARK) + rb"(\d{3});", data)
    return dgrams[int(m.group(1))] if m and int(m.group(1)) < len(dgrams) else None


def required_hooks(net: VlanNet, d: Datagram, extra_tx: tuple[str, ...] = ()) -> set[tuple[str, str]]:
    """Hooks every datagram must have been seen at (more may see it: net_dev_queue of a
    VLAN device...). extra_tx: kernel probes on A's veth transmit path (veth:xmit)."""
    p = d.pair
    need = {("dev:egress", p.a_if), ("net:net_dev_queue", p.a_if), ("net:net_dev_start_xmit", p.a_if),
            ("net:netif_receive_skb", p.b_if), ("dev:ingress", p.b_if), *((k, p.a_if) for k in extra_tx)}
    if net.mode == "vlan-dev":
        need.add(("dev:ingress", p.b_l3))
        if not d.inband:
            need.add(("dev:egress", p.a_l3))
    if net.mode == "tc-push" or d.port == CLOSED_PORT:
        need.add(("drop:kfree_skb", p.b_l3 if net.mode == "vlan-dev" else p.b_if))
    return need


def check_capture(net: VlanNet, d: Datagram, ev: dict, snap: int) -> bytes:
    """Assert what one event of datagram `d` captured; return the frame without its tag."""
    key = hook_key(ev)
    tagged = tagged_at(net, key)
    data = bytes.fromhex(ev["packet"])
    where = f"{key} datagram {d.num} (pair {d.pair.n}, txvlan {d.pair.txvlan}, prio {d.prio}" \
            f"{', in-band' if d.inband else ''}): {data.hex()}"
    wire = d.wire_len(tagged)
    assert ev["packet_link"] == "ethernet", where
    assert ev["packet_len"] == wire, f"packet_len {ev['packet_len']} != {wire} at {where}"
    assert len(data) == min(snap, wire), f"{len(data)} bytes captured at {where}"
    if tagged:
        tci = d.prio << 13 | VID
        assert data[12:16] == b"\x81\x00" + struct.pack("!H", tci), \
            f"tag {data[12:16].hex()} != 8100{tci:04x} at {where}"
        assert ev.get("vlan") == VID, where
        view = data[:12] + data[16:]
    else:
        assert ev.get("vlan") is None, f"vlan {ev.get('vlan')} in the event at {where}"
        view = data
    p = d.pair
    assert view[0:6] == p.b_mac and view[6:12] == p.a_mac, f"MAC addresses at {where}"
    assert view[12:14] == b"\x08\x00", f"ethertype {view[12:14].hex()} (a second tag?) at {where}"
    ihl, tot, proto = view[14], struct.unpack("!H", view[16:18])[0], view[23]
    assert (ihl, tot, proto) == (0x45, 28 + len(d.payload), 17), where
    assert view[26:30] == socket.inet_aton(p.a_ip) and view[30:34] == socket.inet_aton(p.b_ip), where
    dport, ulen = struct.unpack("!HH", view[36:40])
    assert (dport, ulen) == (d.port, 8 + len(d.payload)), where
    assert view[42:] == d.payload[:len(view) - 42], f"payload differs from what was sent at {where}"
    if d.inband:
        sent = d.frame()
        assert view == (sent[:12] + sent[16:])[:len(view)], f"not the frame sent at {where}"
    return view


def check_events(net: VlanNet, dgrams: list[Datagram], events: list[dict], snap: int,
                 extra_tx: tuple[str, ...] = ()) -> dict[int, dict[tuple[str, str], dict]]:
    """Every event of our datagrams captured what check_capture says, each datagram at
    every required hook exactly once, and the same bytes (tag aside) at all its hooks.
    Returns datagram number -> hook -> event."""
    seen: dict[int, dict[tuple[str, str], dict]] = {}
    for ev in events:
        if not ev.get("packet"):
            continue
        d = datagram_of(bytes.fromhex(ev["packet"]), dgrams)
        if d is None or ev.get("proto") != "udp" or ev.get("dport") != d.port:
            continue  # ARP, ICMP errors (they quote our datagrams), IPv6 of the new devices
        key = hook_key(ev)
        assert key not in seen.setdefault(d.num, {}), f"datagram {d.num} twice at {key}"
        view = check_capture(net, d, ev, snap)
        seen[d.num][key] = dict(ev, view=view)
    for d in dgrams:
        hooks = seen.get(d.num, {})
        missing = required_hooks(net, d, extra_tx) - hooks.keys()
        assert not missing, f"datagram {d.num} (pair {d.pair.n}, port {d.port}) not seen at {sorted(missing)}; " \
                            f"seen at {sorted(hooks)}"
        views = [e["view"] for e in hooks.values()]
        shortest = min(len(v) for v in views)
        assert len({v[:shortest] for v in views}) == 1, f"datagram {d.num}: the bytes differ between hooks"
    return seen


# -- pcapng, read by tshark ------------------------------------------------------------------------------

def tshark(*args: str, timeout: float = 120) -> list[str]:
    r = subprocess.run(["tshark", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


HOOK_DEVICE = re.compile(r"/([\w.-]+?)(?::(?:ingress|egress))?$")


def check_pcapng(net: VlanNet, dgrams: list[Datagram], seen: dict[int, dict], pcapng: str, snap: int,
                 frames: int) -> int:
    """tshark's reading of the exported file: `frames` frames in all; every frame of our
    datagrams where a tag belongs has exactly one, with VLAN id 100 and the datagram's
    priority, the right lengths and the payload that was sent; the others have none.
    Returns the number of tagged frames. (Two tshark runs: it starts slowly in the guest.)"""
    rows = tshark("-r", pcapng, "-T", "fields", "-E", "separator=|", "-e", "icmp.type", "-e", "frame.comment",
                  "-e", "frame.len", "-e", "frame.cap_len", "-e", "vlan.id", "-e", "vlan.priority", "-e", "vlan.dei",
                  "-e", "ip.src", "-e", "ip.dst", "-e", "udp.dstport", "-e", "udp.payload")
    assert len(rows) == frames, f"{len(rows)} frames in the pcapng, {frames} events with packet bytes"
    rows = [r.split("|", 1)[1] for r in rows  # ours: UDP to our ports, not ICMP errors quoting them
            if r.split("|")[0] == "" and r.split("|")[-2] in (str(PORT), str(CLOSED_PORT))]
    ours = {(num, key) for num, hooks in seen.items() for key in hooks}
    assert len(rows) == len(ours), f"{len(rows)} frames of our datagrams in the pcapng, {len(ours)} events"
    tagged_rows = 0
    for row in rows:
        comment, flen, caplen, vid, prio, dei, src, dst, dport, data = row.split("|")
        hook = comment.split(";")[0]
        m = HOOK_DEVICE.search(hook)
        assert m, comment
        d = datagram_of(bytes.fromhex(data.replace(":", "")), dgrams)
        assert d is not None, row
        tagged = m.group(1) in net.veths and "drop:kfree_skb" not in hook
        what = f"{hook}: datagram {d.num}: {row}"
        assert int(flen) == d.wire_len(tagged) and int(caplen) == min(snap, int(flen)), what
        if tagged:
            tagged_rows += 1
            assert (vid, prio, dei) == (str(VID), str(d.prio), "0"), what  # one tag, not two
        else:
            assert vid == prio == "", what
        assert (src, dst, dport) == (d.pair.a_ip, d.pair.b_ip, str(d.port)), what
        got = bytes.fromhex(data.replace(":", ""))
        assert got == d.payload[:len(got)] and len(got) == min(len(d.payload), snap - (46 if tagged else 42)), what
    vlan_rows = tshark("-r", pcapng, "-Y", f"vlan.id=={VID} && udp && !icmp", "-T", "fields", "-e", "udp.dstport")
    assert sorted(r for r in vlan_rows if r in (str(PORT), str(CLOSED_PORT))) == sorted(vlan_rows), vlan_rows
    assert len(vlan_rows) == tagged_rows
    return tagged_rows


# -- tcpdump expressions against libpcap ------------------------------------------------------------------

EXPRESSIONS = [
    f"vlan {VID} and udp",
    f"vlan {OTHER_VID}",
    f"vlan and udp dst port {CLOSED_PORT}",
    "udp and not vlan",                                  # VLAN devices, and after the tag was taken
    #                                                      (not `not vlan and udp`: vlan shifts what follows)
    f"vlan {VID} and ether[14] & 0xe0 = 0xa0",           # PCP 5, in the tag's first byte
    f"ether[12:2] = 0x8100 and ether[14:2] & 0x1fff = {VID}",  # DEI 0, VID 100: the TCI in network order
    "vlan and udp and greater 244",                      # 246-byte tagged frames: the tag counts
    f"vlan and udp[8:4] = 0x{MARK.hex()}",               # the payload right after the tag and headers
    f"vlan and src host {NET}.11.1 and udp",             # pair 1 only
    # criteria derived and tested first (vnet/tcpdump/prejudge.py) on the untagged inner packet, also
    # where the skb holds the tag: the expression, which sees the tag, still has the last word
    f"udp dst port {CLOSED_PORT} and src host {NET}.11.1",
    # ... and a port excluded: a datagram whose tag the skb holds is 802.1Q to the expression,
    # which keeps it; step 2a must leave it alone
    f"not port {CLOSED_PORT}",
    f"not host {NET}.11.1",
]


def wanted(calibration: dict, text: str) -> set:
    """The (datagram, hook) pairs whose capture (without an expression) libpcap accepts."""
    from vnet import tcpdump

    expr = tcpdump.compile(text)
    return {k for k, ev in calibration.items()
            if expr.matches(bytes.fromhex(ev["packet"]), link="ethernet", wirelen=ev["packet_len"])}


def expression_events(net: VlanNet, dgrams: list[Datagram], events: list[dict]) -> dict[tuple[int, tuple], dict]:
    """(datagram number, hook) -> event, for the events of our datagrams."""
    out = {}
    for ev in events:
        if ev.get("packet") and ev.get("proto") == "udp":
            d = datagram_of(bytes.fromhex(ev["packet"]), dgrams)
            if d is not None and ev.get("dport") == d.port:
                out[(d.num, hook_key(ev))] = ev
    return out


def run_trace(plans, net: VlanNet, dgrams: list[Datagram], wait, expression: str | None, snap: int,
              until, timeout: float, quiet: float) -> list[dict]:
    """One in-process trace: send every datagram, poll until `until(events)` (or the
    deadline), then `quiet` seconds more for anything that should not be there."""
    from vnet.trace import Trace
    from vnet.trace.filters import PacketFilter

    with Trace(plans, snaplen=snap, packet_filter=PacketFilter(expression=expression) if expression else None) as t:
        send(net, dgrams)
        wait(dgrams, timeout)
        events = t.poll_until(until, timeout)
        end = time.monotonic() + quiet
        while time.monotonic() < end:
            events += t.poll(100)
        assert t.stats().lost == 0
    return events


def check_expression(net: VlanNet, dgrams: list[Datagram], calibration: dict, text: str, events: list[dict]) -> int:
    """vnet reported exactly the (datagram, hook) pairs whose capture libpcap's
    pcap_offline_filter accepts; and anything else it reported, libpcap accepts too.
    Returns how many of ours matched."""
    from vnet import tcpdump

    expr = tcpdump.compile(text)

    def accepts(ev: dict) -> bool:
        data = bytes.fromhex(ev["packet"])
        return expr.matches(data, link="ethernet", wirelen=ev["packet_len"])

    want = wanted(calibration, text)
    got_events = expression_events(net, dgrams, events)
    got = set(got_events)
    problems = []
    if got - want:
        problems.append(f"reported, libpcap rejects: {sorted(got - want)}")
    if want - got:
        problems.append(f"libpcap accepts, not reported: {sorted(want - got)}")
    rejected = [ev for ev in got_events.values() if not accepts(ev)]
    if rejected:
        problems.append(f"reported with bytes libpcap rejects: {[(hook_key(e), e['packet']) for e in rejected]}")
    others = [ev for ev in events if ev.get("packet") and (ev.get("proto") != "udp" or datagram_of(
        bytes.fromhex(ev["packet"]), dgrams) is None) and len(ev["packet"]) // 2 == ev["packet_len"]]
    strangers = [(hook_key(e), e["packet"]) for e in others if not accepts(e)]
    if strangers:
        problems.append(f"other packets reported that libpcap rejects: {strangers}")
    assert not problems, f"expression {text!r}:\n  " + "\n  ".join(problems)
    return len(want)


def calibrate(net: VlanNet, dgrams: list[Datagram], events: list[dict], snap: int,
              extra_tx: tuple[str, ...] = ()) -> dict[tuple[int, tuple], dict]:
    """The events of a trace without an expression, checked, keyed like expression_events."""
    check_events(net, dgrams, events, snap, extra_tx)
    return expression_events(net, dgrams, events)


def wait_for_all(net: VlanNet, dgrams: list[Datagram], extra_tx: tuple[str, ...] = ()):
    """until() for run_trace: every datagram at every required hook."""
    need = {(d.num, k) for d in dgrams for k in required_hooks(net, d, extra_tx)}
    return lambda events: need <= set(expression_events(net, dgrams, events))


# -- the CLI run: vnet trace -s -w, vnet export --to pcapng, tshark ------------------------------------------

def cli_capture(net: VlanNet, tmp_path, probes: tuple[str, ...], snap: int, extra_tx: tuple[str, ...] = (),
                start_timeout: float = 20, settle: float = 1.0) -> dict:
    """`vnet trace -i (every veth and VLAN device) -p PROBES --strict -s SNAP -w FILE`
    while every datagram is sent, stopped with SIGINT; the events checked, exported
    with `vnet export --to pcapng` and read back by tshark. Returns a few numbers."""
    import signal
    import sys

    from kernel_support import VnetProcess
    from vnet.collector.tracefile import TraceFileReader

    trace, out = tmp_path / "vlan.vnt", tmp_path / "vlan.pcapng"
    args = ["trace", "--strict", "-s", str(snap), "-w", str(trace)]
    for spec in net.device_specs():
        args += ["-i", spec]
    for probe in probes:
        args += ["-p", probe]
    dgrams = datagrams(net)
    with receiver(net) as wait, VnetProcess(*args) as p:
        p.wait_started(start_timeout)
        send(net, dgrams)
        wait(dgrams, 10 * settle)
        time.sleep(settle)  # the last hooks' events reach the ring and the file
        p.signal(signal.SIGINT)
        assert p.wait(30 * settle) == 0, p.stderr
    assert p.summary()["lost"] == 0, p.stderr
    events = list(TraceFileReader(trace).events())
    seen = check_events(net, dgrams, events, snap, extra_tx)
    r = subprocess.run([sys.executable, "-m", "vnet", "export", str(trace), "--to", "pcapng", "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    tagged = check_pcapng(net, dgrams, seen, str(out), snap, sum(1 for e in events if e.get("packet")))
    return {"events": len(events), "ours": sum(len(h) for h in seen.values()), "tagged": tagged}


__all__ = ["VID", "PORT", "CLOSED_PORT", "VlanNet", "build", "has_vlan_devices", "datagrams", "send", "receiver",
           "check_events", "check_pcapng", "run_trace", "check_expression", "calibrate",
           "wait_for_all", "wanted", "cli_capture", "EXPRESSIONS"]
