"""Open vSwitch kernel datapath in the guest: ovsdb-server + ovs-vswitchd
(system datapath), a bridge between two netns "VMs", real UDP, and the ovs:*
function probes following every packet."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from vm_support import collect, modprobe, ours

PORT = 7411
RUN = "/var/run/openvswitch"
OVS_PATH = ("ovs:vport_receive", "ovs:dp_process_packet", "ovs:execute_actions", "ovs:vport_send")


def sh(*argv: str, timeout: float = 60) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(argv)}: {out.stderr.strip()}"
    return out.stdout


@pytest.fixture(scope="module")
def ovs(guest_modules):
    """ovsdb-server and ovs-vswitchd on a fresh database (the guest's /etc, /var are throwaway overlays)."""
    if not shutil.which("ovs-vswitchd"):
        pytest.fail("openvswitch-switch is not installed (tools/vm/setup.sh)")
    modprobe("openvswitch")
    for d in (RUN, "/etc/openvswitch", "/var/log/openvswitch"):
        os.makedirs(d, exist_ok=True)
    db = "/etc/openvswitch/conf.db"
    if os.path.exists(db):
        os.unlink(db)
    sh("ovsdb-tool", "create", db, "/usr/share/openvswitch/vswitch.ovsschema")
    sh("ovsdb-server", f"--remote=punix:{RUN}/db.sock", "--pidfile", "--detach", "--log-file")
    sh("ovs-vsctl", "--no-wait", "init")
    sh("ovs-vswitchd", "--pidfile", "--detach", "--log-file")
    try:
        yield
    finally:
        for daemon in ("ovs-vswitchd", "ovsdb-server"):
            subprocess.run(["ovs-appctl", "-t", daemon, "exit"], capture_output=True, timeout=30)


@pytest.mark.parametrize("force", ["fentry", "kprobe"])
def test_ovs_path_is_complete_and_the_first_packet_of_a_flow_is_upcalled(ovs, force):
    """With each backend: every datagram's path, device hook of the ingress port
    -> vport_receive -> dp_process_packet -> execute_actions -> vport_send ->
    device hook of the egress port, one pkt_id, in order; only the flow's first
    packet is upcalled."""
    from vnet.probes import catalog
    from vnet.probes import resolve as resolver
    from vnet.probes.device import resolve as resolve_device
    from vnet.topology import Topology, send_udp, udp_sink, warm_up
    from vnet.trace import Trace
    from vnet.trace.session import device_plan

    count = 10
    with Topology() as topo:
        ns1, ns2 = topo.add_netns("v1"), topo.add_netns("v2")
        host1, vm1 = topo.add_veth_pair("p1", None, "eth0", ns1)
        host2, vm2 = topo.add_veth_pair("p2", None, "eth0", ns2)
        for ifname, ns in ((host1, None), (vm1, ns1), (host2, None), (vm2, ns2)):
            topo.disable_offloads(ifname, ns)
        topo.add_address(vm1, ns1, "10.197.0.1/24")
        topo.add_address(vm2, ns2, "10.197.0.2/24")
        br = f"vnetbr{os.getpid() % 10000}"
        sh("ovs-vsctl", "--timeout=60", "add-br", br)
        try:
            for port in (host1, host2):
                sh("ovs-vsctl", "--timeout=60", "add-port", br, port)
            warm_up(ns1, "10.197.0.2", timeout=20)
            warm_up(ns2, "10.197.0.1", timeout=20)
            sh("ovs-dpctl", "del-flows")  # the UDP flow below starts with a miss
            names = OVS_PATH + ("ovs:dp_upcall",)
            plans = [resolver.plan(resolver.resolve(catalog.BY_NAME[n], force)) for n in names]
            plans += [device_plan(resolve_device(host1), ("ingress",)), device_plan(resolve_device(host2), ("egress",))]
            with Trace(plans) as t, udp_sink(ns2, PORT) as sink:
                assert {h.kind for h in t.hooks if h.probe.startswith("ovs:")} == {force}
                send_udp(ns1, "10.197.0.2", PORT, count=1)
                assert sink.received(expect=1, timeout=10) == 1
                time.sleep(1.0)  # the datapath flow is installed
                send_udp(ns1, "10.197.0.2", PORT, count=count - 1,
                         payload_fn=lambda i: b"vnet-ovs-%06d" % (i + 1))
                assert sink.received(expect=count, timeout=10) == count
                events = collect(t, lambda ev: len(ours(ev, "ovs:vport_send", PORT)) >= count, timeout=30)
        finally:
            subprocess.run(["ovs-vsctl", "--timeout=60", "del-br", br], capture_output=True, timeout=60)
    port_in, port_out = f"dev:{host1}:ingress", f"dev:{host2}:egress"
    names = names + (port_in, port_out)
    by_probe = {n: ours(events, n, PORT) for n in names}
    ids = {n: {e["pkt_id"] for e in evs} for n, evs in by_probe.items()}
    assert len(ids["ovs:vport_receive"]) == count, {n: len(v) for n, v in by_probe.items()}
    for n in OVS_PATH + (port_in, port_out):
        assert ids[n] == ids["ovs:vport_receive"], n
    first = min(by_probe["ovs:vport_receive"], key=lambda e: e["ts_ns"])["pkt_id"]
    assert ids["ovs:dp_upcall"] == {first}
    for pid in ids["ovs:vport_receive"]:  # in order per packet
        ts = [min(e["ts_ns"] for e in by_probe[n] if e["pkt_id"] == pid) for n in (port_in, *OVS_PATH, port_out)]
        assert ts == sorted(ts), (pid, ts)
