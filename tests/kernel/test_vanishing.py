"""Interfaces and namespaces that go away while `vnet trace` runs (issue 11, bad input):
a traced veth deleted, a traced netns deleted. Their hooks go with the device; vnet
must say so once per interface, keep tracing what is left, and when nothing is left
stop by itself: the summary, then one error line, exit code 4 (the "no such
interface" code), nothing left loaded. Real namespaces, veths and `vnet trace`
processes; the devices are deleted with `ip`.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from kernel_support import VnetProcess, new_orphans, vnet_snapshot, wait_until

pytestmark = pytest.mark.kernel


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_netns():
    names = [f"vnv{uuid.uuid4().hex[:6]}" for _ in range(2)]
    for ns in names:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        ip("-n", ns, "link", "set", "va", "up")
        ip("-n", ns, "link", "set", "vb", "up")
    try:
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _warnings(p: VnetProcess) -> list[str]:
    return [line for line in p.stderr if line.startswith("vnet: warning:")]


@pytest.mark.parametrize("write", [False, True], ids=["print", "write"])
def test_deleted_interfaces_are_reported_and_the_last_one_ends_the_trace(two_netns, tmp_path, write):
    before = vnet_snapshot()
    a, b = two_netns
    args = ["trace", "-i", f"{a}/va", "-i", f"{b}/va"] + (["-w", str(tmp_path / "t.vnt")] if write else [])
    with VnetProcess(*args) as p:
        p.wait_started()
        ip("-n", a, "link", "del", "va")   # the first: a warning, the trace goes on
        assert wait_until(lambda: _warnings(p), 10), p.stderr
        assert _warnings(p) == [f"vnet: warning: {a}/va is gone (deleted): its hooks stopped"]
        assert p.proc.poll() is None, "the trace stopped while an interface was left"
        ip("netns", "del", b)              # the last (with its netns): the trace ends by itself
        rc = p.wait(15)
    assert rc == 4, p.stderr
    assert _warnings(p)[1] == f"vnet: warning: {b}/va is gone (network namespace {b} was deleted): its hooks stopped"
    assert p.stderr[-1] == f"vnet: error: every traced interface is gone ({a}/va, {b}/va): nothing left to trace"
    assert not any("Traceback" in line for line in p.stderr)
    if write:  # the file says what went and when, as an agent's at the collector
        from vnet.collector.tracefile import TraceFileReader

        gone = list(TraceFileReader(tmp_path / "t.vnt").chunks(["vanished"]))
        assert [(v["iface"], v["why"]) for v in gone] == [(f"{a}/va", "deleted"),
                                                          (f"{b}/va", f"network namespace {b} was deleted")]
    left = new_orphans(before)
    assert not left.progs and not left.links, left


def test_a_deleted_interface_beside_a_kernel_probe_only_warns(two_netns):
    """With a tracepoint probe too, something is still traced: the warning, no stop."""
    a, _ = two_netns
    with VnetProcess("trace", "-i", f"{a}/va", "-p", "net:netif_receive_skb") as p:
        p.wait_started()
        ip("-n", a, "link", "del", "va")
        assert wait_until(lambda: _warnings(p), 10), p.stderr
        assert p.proc.poll() is None


def test_a_namespace_caught_halfway_through_its_deletion_reads_as_deleted(two_netns):
    """`ip netns del` unmounts the namespace, then unlinks its name: a poll in between (or a
    name a crash left behind) finds a plain file, which setns refuses. That is the namespace
    deleted, not the device deleted in a namespace still there (it failed CI once, as a race)."""
    from vnet import netns
    from vnet.errors import NoSuchInterfaceError
    from vnet.probes.device import gone, resolve

    _, b = two_netns
    dev = resolve(f"{b}/va")
    assert gone(dev) is None
    subprocess.run(["umount", netns.path(b)], check=True, capture_output=True, timeout=30)  # the first half
    try:
        assert gone(dev) == f"network namespace {b} was deleted"
        with pytest.raises(NoSuchInterfaceError, match=f"no such network namespace: {b} "):
            with netns.enter(b):
                pass
    finally:
        subprocess.run(["rm", "-f", netns.path(b)], capture_output=True, timeout=30)
