"""tests/vm run inside a throwaway VM booted on Debian's 6.1 kernel (kprobes,
fentry, openvswitch.ko): tools/vm/run_in_guest.py boots it once and runs this
directory there with VNET_IN_GUEST=1. Anywhere else every test here is skipped.

Inside the guest the host's root filesystem is shared read-only (same Python,
libbpf, .venv, checkout and committed bpf/build objects); /lib, /tmp, /var,
/etc are copy-on-write overlays, so modprobe and `ip netns` work.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IN_GUEST = os.environ.get("VNET_IN_GUEST") == "1"
SKIP_REASON = "runs inside the 6.1 VM only: sudo tools/vm/run_in_guest.py (sets VNET_IN_GUEST=1)"


def pytest_configure(config):
    config.addinivalue_line("markers", "vm: runs inside the VM booted by tools/vm/run_in_guest.py")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.vm)
            if not IN_GUEST:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def modprobe(*modules: str) -> None:
    out = subprocess.run(["modprobe", "-a", *modules], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"modprobe {' '.join(modules)}: {out.stderr.strip()}"
    for m in modules:
        assert os.path.isdir(f"/sys/module/{m}"), f"module {m} not loaded after modprobe"


@pytest.fixture(scope="session")
def guest_modules():
    """The modules the catalog's function probes live in (6.1 has them as .ko)."""
    modprobe("veth", "tun", "bridge", "openvswitch")
    from vnet.probes import resolve as resolver

    resolver._module_btf.cache_clear()  # module BTF appeared after any earlier lookup
    resolver._kallsyms.cache_clear()


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
