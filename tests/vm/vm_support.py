"""Shared by the tests in tests/vm (run inside the 6.1 guest): module loading, a
two-namespace veth topology, trace helpers."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def modprobe(*modules: str) -> None:
    out = subprocess.run(["modprobe", "-a", *modules], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"modprobe {' '.join(modules)}: {out.stderr.strip()}"
    for m in modules:
        assert os.path.isdir(f"/sys/module/{m}"), f"module {m} not loaded after modprobe"


def veth_pair(subnet: int):
    """ns1/ifA <-veth-> ns2/ifB, offloads off, 10.198.<subnet>.1/.2, ARP done
    (generous timeouts: software emulation is slow)."""
    from vnet.topology import veth_pair as make

    return make(subnet, net="10.198", warm_timeout=10)


def collect(t, until, timeout: float = 20.0) -> list[dict]:
    """Poll the trace until `until(events)` or the deadline (software emulation is slow)."""
    return t.poll_until(until, timeout)


def ours(events, probe: str, dport: int) -> list[dict]:
    return [e for e in events if e["probe"] == probe and e.get("proto") == "udp" and e.get("dport") == dport]


def load_plan(plan, probe_id: int = 0):
    """Open, configure and load a plan's object exactly as vnet.trace.Trace does,
    without attaching; the caller closes it."""
    from vnet.binding import BpfObject
    from vnet.objects import object_path
    from vnet.trace.session import DEFAULT_RING_BYTES, wakeup_config

    obj = BpfObject(object_path(plan.obj))
    try:
        obj.set_config(plan.config_var, {"probe_id": probe_id, **wakeup_config(DEFAULT_RING_BYTES), **plan.config})
        obj.keep_programs(plan.programs)
        if plan.prepare:
            plan.prepare(obj)
        obj.load()
    except BaseException:
        obj.close()
        raise
    return obj
