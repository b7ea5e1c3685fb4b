"""The remaining function probes for real, with each backend (fentry, kprobe)
and automatic choice: socket send/receive entries, the tap (tun) device in
both directions, and the bridge's delivery to the host stack."""

from __future__ import annotations

import fcntl
import os
import socket
import struct

import pytest

from vm_support import collect

BACKENDS = pytest.mark.parametrize("force", ["fentry", "kprobe", None], ids=["fentry", "kprobe", "auto"])


def plans(names, force):
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver

    out = []
    for name in names:
        res = resolver.resolve(catalog.BY_NAME[name], force)
        assert res.available, f"{name}: {res.why_not}"
        out.append(resolver.plan(res))
    return out


@BACKENDS
def test_socket_probes_fire_for_this_process(force, guest_modules):
    """udp/tcp sendmsg and recvmsg entries, with the calling task's pid and comm."""
    from vnet.topology import tcp_exchange, veth_pair
    from vnet.trace import Trace

    names = ("sock:udp_sendmsg", "sock:udp_recvmsg", "sock:tcp_sendmsg", "sock:tcp_recvmsg")
    with veth_pair(41 if force else 42, net="10.198", warm_timeout=10) as net, Trace(plans(names, force)) as t:
        kinds = {h.probe: h.kind for h in t.hooks}
        assert set(kinds.values()) == {force or "fentry"}
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(5):
            tx.sendto(b"vnet", rx.getsockname())
            rx.recv(64)
        rx.close(), tx.close()
        assert tcp_exchange(net.ns1, net.ns2, net.ip2, 7500, 3000) == 3000
        events = collect(t, lambda ev: {e["probe"] for e in ev} >= set(names), timeout=30)
    mine = [e for e in events if e.get("pid") == os.getpid()]
    for name in names:
        got = [e for e in mine if e["probe"] == name]
        assert got, f"no {name} event from this process"
        assert all(e["proto"] is None and e["comm"] and e["hook"] == (force or "fentry") for e in got)
    assert len([e for e in mine if e["probe"] == "sock:udp_sendmsg"]) >= 5


TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000


@BACKENDS
def test_tap_device_both_directions(force, guest_modules):
    """A VM's tap: a frame written by the "VM" (tun_get_user) reaches the host
    stack; a datagram the host sends to the VM leaves through tun_net_xmit with
    the same pkt_id as at the tap's tc egress hook."""
    from vnet import netns
    from vnet.probes.device import resolve as resolve_device
    from vnet.topology import Topology
    from vnet.trace import Trace
    from vnet.trace.session import device_plan

    with Topology() as topo:
        ns = topo.add_netns("h")
        with netns.enter(ns):
            fd = os.open("/dev/net/tun", os.O_RDWR)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"tap0", IFF_TAP | IFF_NO_PI))
            topo.run(ns, ["ip", "addr", "add", "10.198.50.1/24", "dev", "tap0"])
            topo.run(ns, ["ip", "link", "set", "tap0", "up"])
            topo.run(ns, ["ip", "neigh", "add", "10.198.50.2", "lladdr", "02:00:00:00:00:02", "dev", "tap0"])
            mac = bytes.fromhex(topo.run(ns, ["cat", "/sys/class/net/tap0/address"]).stdout.strip().replace(":", ""))
            all_plans = plans(("tun:net_xmit", "tun:get_user"), force)
            all_plans.append(device_plan(resolve_device(f"{ns}/tap0"), ("egress",)))
            with Trace(all_plans) as t:
                with netns.enter(ns):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                for i in range(4):  # host -> VM: out through the tap
                    s.sendto(b"to-vm-%d" % i, ("10.198.50.2", 7600))
                s.close()
                udp = struct.pack("!HHHH", 7601, 7601, 8 + 5, 0) + b"hello"
                ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                                 socket.inet_aton("10.198.50.2"), socket.inet_aton("10.198.50.1"))
                frame = mac + b"\x02\x00\x00\x00\x00\x02\x08\x00" + ip + udp
                for _ in range(3):  # VM -> host: written into the tap
                    os.write(fd, frame)
                events = collect(t, lambda ev: len([e for e in ev if e["probe"] == "tun:net_xmit"]) >= 4
                                 and len([e for e in ev if e["probe"] == "tun:get_user"]) >= 3, timeout=30)
        finally:
            os.close(fd)
    xmit = [e for e in events if e["probe"] == "tun:net_xmit" and e.get("dport") == 7600]
    egress = [e for e in events if e["probe"].endswith("tap0:egress") and e.get("dport") == 7600]
    assert len(xmit) == 4 and {e["pkt_id"] for e in xmit} == {e["pkt_id"] for e in egress}
    writes = [e for e in events if e["probe"] == "tun:get_user"]
    assert len(writes) >= 3 and all(e["pid"] == os.getpid() for e in writes)


@BACKENDS
def test_bridge_pass_frame_up_for_traffic_to_the_host(force, guest_modules):
    from vnet.topology import Topology, ping, warm_up
    from vnet.trace import Trace

    with Topology.two_vms_behind_bridge() as net:
        net.topology.add_address(net.bridge, net.host_ns, "10.199.0.254/24")
        warm_up(net.vm1_ns, "10.199.0.254", timeout=10)
        with Trace(plans(("bridge:pass_frame_up",), force)) as t:
            assert ping(net.vm1_ns, "10.199.0.254", count=4, timeout=5) == 4
            events = collect(t, lambda ev: len([e for e in ev if e.get("proto") == "icmp"]) >= 4, timeout=20)
    up = [e for e in events if e.get("proto") == "icmp" and e.get("icmp_type") == 8]
    assert len(up) == 4 and {e["dst"] for e in up} == {"10.199.0.254"}


@BACKENDS
def test_socket_send_and_delivery_carry_the_packets_pkt_id(force, guest_modules):
    """ip:output (a sent packet's first point with whole headers), sock:udp_enqueue and
    sock:udp_read (the receiving socket's queue and the application's read) give each
    datagram the pkt_id the veth's tc hooks give it, sender and reader named."""
    from vnet import netns
    from vnet.probes.device import resolve as resolve_device
    from vnet.topology import veth_pair
    from vnet.trace import Trace
    from vnet.trace.session import device_plan

    names = ("ip:output", "sock:udp_enqueue", "sock:udp_read")
    with veth_pair(43 if force else 44, net="10.198", warm_timeout=10) as net:
        all_plans = plans(names, force)
        all_plans.append(device_plan(resolve_device(f"{net.ns1}/{net.if1}"), ("egress",)))
        all_plans.append(device_plan(resolve_device(f"{net.ns2}/{net.if2}"), ("ingress",)))
        with netns.enter(net.ns2):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with netns.enter(net.ns1):
            tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind((net.ip2, 7700))
        with Trace(all_plans) as t:
            for i in range(5):
                tx.sendto(b"sock-path-%d" % i, (net.ip2, 7700))
                assert rx.recv(64) == b"sock-path-%d" % i
            events = collect(t, lambda ev: all(len([e for e in ev if e["probe"] == n and e.get("dport") == 7700])
                                               >= 5 for n in names), timeout=30)
        rx.close(), tx.close()
    mine = [e for e in events if e.get("dport") == 7700]
    ids = {n: [e["pkt_id"] for e in mine if e["probe"] == n] for n in names}
    wire = {e["pkt_id"] for e in mine if e["probe"].endswith(":egress")}
    assert len(wire) == 5 and wire == {e["pkt_id"] for e in mine if e["probe"].endswith(":ingress")}
    for n in names:
        assert len(ids[n]) == 5 and set(ids[n]) == wire, (n, ids, wire)
    for n in ("ip:output", "sock:udp_read"):   # both in this process's task
        assert all(e["pid"] == os.getpid() and e["hook"] == (force or "fentry") for e in mine if e["probe"] == n)
