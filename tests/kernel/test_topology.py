"""Topology builds real namespaces, carries traffic and leaves nothing behind."""

import socket
import subprocess
import threading

import pytest

from vnet.topology import (
    Topology,
    TopologyError,
    in_netns,
    netns_cookie,
    ping,
    send_udp,
    tcp_exchange,
    udp_sink,
    warm_up,
)

pytestmark = pytest.mark.kernel


def named_netns(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def root_links(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]
    return [name for name in names if name.startswith(prefix)]


def leftovers(prefix: str) -> list[str]:
    """Namespaces and root-namespace links whose name carries `prefix`."""
    return named_netns(prefix) + root_links(prefix)


def test_two_vms_reach_each_other_and_vanish() -> None:
    with Topology.two_vms_behind_bridge() as net:
        prefix = net.topology.prefix
        assert set(net.topology.namespaces) == {net.host_ns, net.vm1_ns, net.vm2_ns}
        assert ping(net.vm1_ns, net.vm2_ip, count=3) == 3
        assert ping(net.vm2_ns, net.vm1_ip6, count=3) == 3

        warm_up(net.vm1_ns, net.vm2_ip)
        with udp_sink(net.vm2_ns, 5000) as sink:
            send_udp(net.vm1_ns, net.vm2_ip, 5000, count=100)
            assert sink.received(timeout=5, expect=100) == 100
            assert sink.received(timeout=0.2) == 100  # and not one more
            assert sink.payloads == [b"vnet-%06d" % i for i in range(100)]

        assert tcp_exchange(net.vm1_ns, net.vm2_ns, net.vm2_ip, 6000, 1 << 20) == 1 << 20
        assert root_links(prefix) == []  # every device lives in its own namespace
        assert sorted(named_netns(prefix)) == sorted(net.topology.namespaces)
        assert net.topology.ifindex(net.host_ports[0], net.host_ns) > 0
        assert "tx-checksumming: off" in net.topology.run(
            net.vm1_ns, ["ethtool", "-k", net.vm_if]).stdout
    assert leftovers(prefix) == []


def test_exception_inside_with_cleans_up() -> None:
    with pytest.raises(ZeroDivisionError):
        with Topology.two_vms_behind_bridge() as net:
            prefix = net.topology.prefix
            1 / 0
    assert leftovers(prefix) == []


def test_partial_build_and_root_namespace_devices_are_removed() -> None:
    with pytest.raises(TopologyError, match="no interface"):
        with Topology() as topo:
            ns = topo.add_netns("a")
            outer, inner = topo.add_veth_pair("out", None, "eth0", ns)
            topo.add_bridge("br", None)
            assert (outer, inner) == (topo.prefix + "out", "eth0")
            assert set(leftovers(topo.prefix)) == {ns, outer, topo.prefix + "br"}
            topo.add_address("missing", ns, "10.199.9.1/24")
    assert leftovers(topo.prefix) == []
    topo.close()  # idempotent


def test_names_longer_than_ifnamsiz_are_refused() -> None:
    with Topology() as topo:
        with pytest.raises(ValueError, match="longer than 15"):
            topo.add_bridge("x" * 10, None)  # 7-char prefix + 10 > 15


def test_in_netns_moves_only_the_calling_thread() -> None:
    with Topology() as topo:
        ns = topo.add_netns("a")
        here = netns_cookie(None)
        seen_by_other_thread = []
        with in_netns(ns):
            assert [name for _, name in socket.if_nameindex()] == ["lo"]
            worker = threading.Thread(
                target=lambda: seen_by_other_thread.append(netns_cookie(None)))
            worker.start()
            worker.join()
            inside = netns_cookie(None)
        assert netns_cookie(None) == here
        assert netns_cookie(ns) == inside != here
        # A thread started inside inherits the namespace of its creator.
        assert seen_by_other_thread == [inside]
