"""tests/vm run inside a throwaway VM booted on Debian's 6.1 kernel (kprobes,
fentry, openvswitch.ko): tools/vm/run_in_guest.py boots it once and runs this
directory there with VNET_IN_GUEST=1. Anywhere else every test here is skipped.

Inside the guest the host's root filesystem is shared read-only (same Python,
libbpf, .venv, checkout and committed bpf/build objects); /lib, /tmp, /var,
/etc are copy-on-write overlays, so modprobe and `ip netns` work.
"""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def guest_modules():
    """The modules the catalog's function probes live in (6.1 has them as .ko)."""
    from vm_support import modprobe

    modprobe("veth", "tun", "bridge", "openvswitch")
    from vnet.probes import resolve as resolver

    resolver._module_btf.cache_clear()  # module BTF appeared after any earlier lookup
    resolver._kallsyms.cache_clear()
