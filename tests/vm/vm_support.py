"""Shared by the tests in tests/vm (run inside the 6.1 guest): module loading, a
two-namespace veth topology, trace helpers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modprobe(*modules: str) -> None:
    out = subprocess.run(["modprobe", "-a", *modules], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"modprobe {' '.join(modules)}: {out.stderr.strip()}"
    for m in modules:
        assert os.path.isdir(f"/sys/module/{m}"), f"module {m} not loaded after modprobe"


@dataclass
class VethPair:
    topo: object
    ns1: str
    ns2: str
    if1: str
    if2: str
    ip1: str
    ip2: str

    @property
    def spec1(self) -> str:
        return f"{self.ns1}/{self.if1}"

    @property
    def spec2(self) -> str:
        return f"{self.ns2}/{self.if2}"


@contextlib.contextmanager
def veth_pair(subnet: int):
    """ns1/ifA <-veth-> ns2/ifB, offloads off, 10.198.<subnet>.1/.2, ARP done."""
    from vnet.topology import Topology, warm_up

    with Topology() as topo:
        ns1, ns2 = topo.add_netns("a"), topo.add_netns("b")
        if1, if2 = topo.add_veth_pair("ifA", ns1, "ifB", ns2)
        for ifname, ns in ((if1, ns1), (if2, ns2)):
            topo.disable_offloads(ifname, ns)
        ip1, ip2 = f"10.198.{subnet}.1", f"10.198.{subnet}.2"
        topo.add_address(if1, ns1, f"{ip1}/24")
        topo.add_address(if2, ns2, f"{ip2}/24")
        warm_up(ns1, ip2, timeout=10)
        warm_up(ns2, ip1, timeout=10)
        yield VethPair(topo, ns1, ns2, if1, if2, ip1, ip2)


def collect(t, until, timeout: float = 20.0) -> list[dict]:
    """Poll the trace until `until(events)` or the deadline (software emulation is slow)."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += t.poll(100)
        if until(events):
            break
    return events + t.drain()


def ours(events, probe: str, dport: int) -> list[dict]:
    return [e for e in events if e["probe"] == probe and e.get("proto") == "udp" and e.get("dport") == dport]


def load_plan(plan, probe_id: int = 0):
    """Open, configure and load a plan's object exactly as vnet.trace.Trace does,
    without attaching; the caller closes it."""
    from vnet.binding import BpfObject
    from vnet.objects import object_path
    from vnet.trace.session import DEFAULT_WAKEUP_EVERY

    obj = BpfObject(object_path(plan.obj))
    try:
        obj.set_config(plan.config_var, {"probe_id": probe_id, "wakeup_every": DEFAULT_WAKEUP_EVERY, **plan.config})
        obj.keep_programs(plan.programs)
        if plan.prepare:
            plan.prepare(obj)
        obj.load()
    except BaseException:
        obj.close()
        raise
    return obj
