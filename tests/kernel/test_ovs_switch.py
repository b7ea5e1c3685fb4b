"""vnet.ovs.UserspaceSwitch: a private Open vSwitch (its own ovsdb-server and
ovs-vswitchd, userspace datapath) forwards between namespace VMs, keeps the
qdiscs it is given, touches no system instance, and leaves no process, socket
or file behind -- also when the body raises and when its owner is SIGKILLed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import pytest

from vnet.ovs import UserspaceSwitch
from vnet.topology import Topology, ping, tcp_exchange, warm_up

pytestmark = pytest.mark.kernel
SYSTEM_PATHS = ("/var/run/openvswitch", "/run/openvswitch", "/etc/openvswitch/conf.db", "/var/log/openvswitch")


@pytest.fixture(autouse=True)
def _ovs(need_ovs):
    pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pids, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _system_state() -> dict[str, float | None]:
    return {p: (os.stat(p).st_mtime if os.path.exists(p) else None) for p in SYSTEM_PATHS}


def _two_vms(topo: Topology, net: str):
    host = topo.add_netns("host")
    vms = []
    for i in (1, 2):
        vm = topo.add_netns(f"vm{i}")
        port, vif = topo.add_veth_pair(f"p{i}", host, "eth0", vm)
        topo.disable_offloads(port, host)
        topo.disable_offloads(vif, vm)
        topo.add_address(vif, vm, f"{net}.{i}/24")
        vms.append(vm)
    return host, vms


def test_userspace_switch_forwards_keeps_qdiscs_and_leaves_nothing(tmp_path):
    before = _system_state()
    logs = tmp_path / "logs"
    with Topology() as topo:
        host, (vm1, vm2) = _two_vms(topo, "10.204.0")
        with UserspaceSwitch(netns=host, log_dir=logs) as sw:
            run_dir, pids = sw.run_dir, sw.pids
            assert set(pids) == {"ovsdb-server", "ovs-vswitchd"} and all(_alive(p) for p in pids.values())
            assert run_dir.is_dir() and sw.db_socket.exists() and sw.ctl("ovs-vswitchd").exists()
            # ovs-vswitchd runs inside the host namespace
            with topo.in_netns(host):
                host_ns = os.readlink("/proc/thread-self/ns/net")
            assert os.readlink(f"/proc/{pids['ovs-vswitchd']}/ns/net") == host_ns
            br = sw.add_bridge("br0")
            topo.run(host, ["tc", "qdisc", "add", "dev", "p2", "root", "tbf", "rate", "50mbit",
                            "burst", "10kb", "limit", "60kb"])
            sw.add_port(br, "p1")
            sw.add_port(br, "p2")
            assert "netdev" in sw.vsctl("get", "bridge", br, "datapath_type")
            assert sorted(sw.vsctl("list-ports", br).split()) == ["p1", "p2"]
            warm_up(vm1, "10.204.0.2", timeout=10)
            assert ping(vm1, "10.204.0.2", count=5) == 5
            # TCP through the userspace datapath: needs TX checksum offload off (disable_offloads)
            assert tcp_exchange(vm1, vm2, "10.204.0.2", 6100, 1 << 20) == 1 << 20
            assert "in_port" in sw.dump_flows()
            # Open vSwitch left the tbf alone (QoS linux-noop), and the TCP flow went through it
            qdisc = topo.run(host, ["tc", "-s", "qdisc", "show", "dev", "p2"]).stdout
            assert "tbf" in qdisc and " Sent 0 bytes" not in qdisc, qdisc
        assert _gone(pids.values()) == []
        assert not run_dir.exists()
        assert (logs / "ovs-vswitchd.log").stat().st_size > 0 and (logs / "ovsdb-server.log").exists()
        assert not sw.running()
        sw.stop()  # idempotent
    assert _system_state() == before  # no system instance's files were created or written


def test_the_switch_stops_when_the_body_raises():
    with Topology() as topo:
        host, _ = _two_vms(topo, "10.204.1")
        with pytest.raises(RuntimeError, match="boom"):
            with UserspaceSwitch(netns=host) as sw:
                pids, run_dir = sw.pids, sw.run_dir
                sw.add_bridge("br0")
                raise RuntimeError("boom")
    assert _gone(pids.values()) == [] and not run_dir.exists()


def test_a_failing_start_leaves_nothing(tmp_path):
    """ovs-vswitchd cannot enter a namespace that does not exist: the error names it, ovsdb-server is stopped."""
    sw = UserspaceSwitch(netns="vnet-no-such-netns-x", run_dir=tmp_path / "run", timeout=10)
    with pytest.raises(Exception, match="ovs-vswitchd"):
        sw.start()
    assert not sw.running()
    assert all(not _alive(p.pid) for p in sw._procs.values())


def test_the_daemons_die_with_their_sigkilled_owner():
    """PR_SET_PDEATHSIG: the owner never ran its cleanup, the daemons go anyway."""
    script = ("import sys, time\n"
              "from vnet.ovs import UserspaceSwitch\n"
              "sw = UserspaceSwitch().start()\n"
              "print(sw.pids['ovsdb-server'], sw.pids['ovs-vswitchd'], sw.run_dir, flush=True)\n"
              "time.sleep(60)\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        line = owner.stdout.readline().split()
        assert len(line) == 3, "the owner did not start the switch"
        pids = [int(line[0]), int(line[1])]
        assert all(_alive(p) for p in pids)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
    assert _gone(pids) == []
    # only the (private, temporary) run directory is left: what SIGKILL cannot clean
    shutil.rmtree(line[2], ignore_errors=True)
